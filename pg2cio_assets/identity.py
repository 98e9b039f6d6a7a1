"""Identity resolution: every customer_id and every email seen -> one person key. Pure pandas.

Rules (the README documents them from here):
- customer_id is the person key and the Customer.io `id` of every account.
- Emails are trimmed and lower-cased before any match; nothing provider-specific.
- A guest email belongs to the account whose current email it is, else to the account that
  held it before (customer_email_changes); current beats previous.
- An email two accounts claim at the same rank is ambiguous: the accounts stay separate,
  flagged `email_shared`, and guest rows under that email are quarantined, never guessed.
- Any other usable guest email is one guest person, keyed by a hash of the normalized email
  and identified in Customer.io by `email`.
- A guest email seen before its account held it (before sign-up, or before the email change
  that gave it to the account) yields one merge (primary id = customer_id, secondary email):
  Customer.io may hold a guest profile for it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import pandas as pd
import pandera.pandas as pa

_USABLE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

REASON_NO_EMAIL = "no customer_id and no email"
REASON_UNUSABLE = "no customer_id and an unusable email"
REASON_SHARED = "no customer_id and an email shared by accounts"

# Output tables: (column, type in the state database); the frames carry these columns in order.
IDENTITY_MAP_TABLE = [("identifier_type", "text"), ("identifier", "text"), ("normalized", "text"),
                      ("person_key", "text"), ("rule", "text"), ("reason", "text")]
PEOPLE_TABLE = [("person_key", "text"), ("person_type", "text"), ("customer_id", "text"), ("email", "text"),
                ("cio_identifier_type", "text"), ("cio_identifier", "text"), ("first_name", "text"),
                ("last_name", "text"), ("email_consent", "boolean"), ("sms_consent", "boolean"),
                ("created_at", "timestamptz"), ("deleted_at", "timestamptz"), ("email_shared", "boolean")]
MERGES_TABLE = [("merge_id", "text"), ("primary_id", "text"), ("secondary_email", "text"),
                ("guest_first_seen_at", "timestamptz"), ("email_acquired_at", "timestamptz")]
IDENTITY_MAP_COLUMNS = [c for c, _ in IDENTITY_MAP_TABLE]
PEOPLE_COLUMNS = [c for c, _ in PEOPLE_TABLE]
MERGE_COLUMNS = [c for c, _ in MERGES_TABLE]


def _is_timestamp(s: pd.Series) -> pd.Series:
    return s.isna() | pd.to_datetime(s, utc=True, errors="coerce").notna()


def table_schema(name: str, table: list[tuple[str, str]], required: tuple[str, ...], unique: tuple[str, ...]) -> pa.DataFrameSchema:
    """A Pandera schema for one output table: types from its column list, required and unique columns."""
    columns = {}
    for col, pg_type in table:
        if pg_type == "timestamptz":
            columns[col] = pa.Column(checks=pa.Check(_is_timestamp, error="must be a timestamp"), nullable=col not in required)
        else:
            columns[col] = pa.Column(bool if pg_type == "boolean" else str, nullable=col not in required)
    return pa.DataFrameSchema(columns, unique=list(unique), report_duplicates="all", strict=True, ordered=True, name=name)


SCHEMAS = {
    "identity_map": table_schema("identity_map", IDENTITY_MAP_TABLE, ("identifier_type", "identifier"), ("identifier_type", "identifier")),
    "people": table_schema("people", PEOPLE_TABLE, ("person_key", "person_type", "cio_identifier_type", "cio_identifier",
                                                    "email_consent", "sms_consent", "email_shared"), ("person_key",)),
    "identity_merges": table_schema("identity_merges", MERGES_TABLE, ("merge_id", "primary_id", "secondary_email"), ("merge_id",)),
}


def normalize_email(raw: object) -> str | None:
    """Trimmed, lower-cased email, or None when there is none or it cannot be an address."""
    if not isinstance(raw, str):
        return None
    email = raw.strip().lower()
    return email if _USABLE.match(email) else None


def guest_key(normalized_email: str) -> str:
    """Stable person key of a guest: the same email gives the same key on every run."""
    return "guest_" + hashlib.sha256(normalized_email.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Identities:
    identity_map: pd.DataFrame  # IDENTITY_MAP_COLUMNS: one row per identifier seen
    people: pd.DataFrame  # PEOPLE_COLUMNS: one row per real person
    merges: pd.DataFrame  # MERGE_COLUMNS: guest profiles to fold into accounts

    def validate(self) -> None:
        """Pandera on every output frame; a failure here is a bug in pg2cio, named by table and column."""
        for name, df in (("identity_map", self.identity_map), ("people", self.people), ("identity_merges", self.merges)):
            try:
                SCHEMAS[name].validate(df, lazy=True)
            except pa.errors.SchemaErrors as exc:
                fc = exc.failure_cases.head(5)
                raise ValueError(f"{name} breaks its schema: " + "; ".join(
                    f"column {c!r} {chk}: {v!r}" for c, chk, v in zip(fc["column"], fc["check"], fc["failure_case"]))) from None

    def check_failures(self) -> dict[str, list[str]]:
        """What the blocking checks would fail on: duplicated customer_ids, unflagged shared emails."""
        people = self.people
        cust = people["customer_id"].dropna()
        emails = people.dropna(subset=["email"])
        clash = emails.groupby("email").filter(lambda g: len(g) > 1 and not g["email_shared"].all())
        return {
            "one_person_per_customer_id": sorted(cust[cust.duplicated()].unique().tolist()),
            "no_email_on_two_people_unless_flagged": sorted(clash["email"].unique().tolist()),
        }

    def counts(self) -> dict[str, int]:
        m = self.identity_map
        return {
            "people": len(self.people),
            "accounts": int((self.people["person_type"] == "account").sum()),
            "guests": int((self.people["person_type"] == "guest").sum()),
            "merges": len(self.merges),
            "accounts_sharing_an_email": int(self.people["email_shared"].sum()),
            "unresolved_emails": int(m["person_key"].isna().sum()),
        }


def _email_owners(accounts: pd.DataFrame, email_changes: pd.DataFrame) -> pd.DataFrame:
    """normalized email -> the account(s) that claim it, with rank (1 current, 2 previous)."""
    current = pd.DataFrame({"normalized": accounts["email"].map(normalize_email), "customer_id": accounts["customer_id"], "rank": 1})
    previous = pd.concat(
        [
            pd.DataFrame({"normalized": email_changes[col].map(normalize_email), "customer_id": email_changes["customer_id"], "rank": 2})
            for col in ("old_email", "new_email")
        ]
    )
    owners = pd.concat([current, previous]).dropna(subset=["normalized"]).drop_duplicates(["normalized", "customer_id", "rank"])
    # An email keeps only its best rank: a current owner beats any previous one.
    best = owners.groupby("normalized")["rank"].transform("min")
    return owners[owners["rank"] == best]


def email_acquired_at(accounts: pd.DataFrame, email_changes: pd.DataFrame) -> dict[tuple[str, str], pd.Timestamp]:
    """(customer_id, normalized email) -> when the account came to hold that email.

    Its first email (the old_email of its earliest change, else its current one) it held
    from sign-up; any other from the first change that gave it that email. Guest activity
    under an email before that moment may have made a guest profile in Customer.io."""
    created = accounts.set_index("customer_id")["created_at"]
    first = {c: normalize_email(e) for c, e in zip(accounts["customer_id"], accounts["email"])}
    out: dict[tuple[str, str], pd.Timestamp] = {}
    changes = email_changes.sort_values(["customer_id", "changed_at"], kind="stable")
    seen_first: set[str] = set()
    for c, old, new, at in changes[["customer_id", "old_email", "new_email", "changed_at"]].itertuples(index=False, name=None):
        if c not in seen_first:
            seen_first.add(c)
            first[c] = normalize_email(old)
        new_norm = normalize_email(new)
        if new_norm and (c, new_norm) not in out:
            out[(c, new_norm)] = at
    for c, e in first.items():
        if e and c in created.index:
            out[(c, e)] = created[c]
    return out


def resolve_identities(accounts: pd.DataFrame, email_changes: pd.DataFrame, guest_emails: pd.DataFrame) -> Identities:
    """Resolve accounts, their email history and the emails seen on guest rows into people.

    accounts: customer_id, email, first_name, last_name, email_consent, sms_consent, created_at, deleted_at
    email_changes: customer_id, old_email, new_email, changed_at
    guest_emails: email (as typed, may be None), first_seen_at: one row per distinct email on
        orders and carts that have no customer_id.
    """
    accounts = accounts.sort_values("customer_id", kind="stable").reset_index(drop=True)
    owners = _email_owners(accounts, email_changes)
    claims = owners.groupby("normalized").agg(
        owner=("customer_id", "min"), owners=("customer_id", lambda s: sorted(set(s))), rank=("rank", "min")
    )
    claims["ambiguous"] = claims["owners"].map(len) > 1
    shared_accounts = {c for owners_ in claims.loc[claims["ambiguous"], "owners"] for c in owners_}

    # --- accounts -------------------------------------------------------------------------
    acc_norm = accounts["email"].map(normalize_email)
    people_acc = pd.DataFrame(
        {
            "person_key": accounts["customer_id"],
            "person_type": "account",
            "customer_id": accounts["customer_id"],
            "email": acc_norm,
            "cio_identifier_type": "id",
            "cio_identifier": accounts["customer_id"],
            "first_name": accounts["first_name"],
            "last_name": accounts["last_name"],
            "email_consent": accounts["email_consent"].astype(bool),
            "sms_consent": accounts["sms_consent"].astype(bool),
            "created_at": accounts["created_at"],
            "deleted_at": accounts["deleted_at"],
            "email_shared": accounts["customer_id"].isin(shared_accounts),
        }
    )
    map_rows = [
        pd.DataFrame(
            {
                "identifier_type": "customer_id",
                "identifier": accounts["customer_id"],
                "normalized": accounts["customer_id"],
                "person_key": accounts["customer_id"],
                "rule": "customer_id",
                "reason": None,
            }
        )
    ]

    # --- every email identifier: account emails, previous emails, guest emails as typed -----
    seen = guest_emails[["email", "first_seen_at"]].copy()
    seen["normalized"] = seen["email"].map(normalize_email)
    account_emails = claims.reset_index()[["normalized"]].assign(email=lambda d: d["normalized"])
    identifiers = pd.concat([account_emails[["email", "normalized"]], seen[["email", "normalized"]]]).drop_duplicates("email")
    identifiers = identifiers.merge(claims, how="left", left_on="normalized", right_index=True)

    def route(row) -> tuple[str | None, str | None, str | None]:
        if not isinstance(row.email, str) or not row.email.strip():
            return None, None, REASON_NO_EMAIL
        if row.normalized is None:
            return None, None, REASON_UNUSABLE
        if isinstance(row.owners, list):
            if row.ambiguous:
                return None, None, f"{REASON_SHARED} {', '.join(row.owners)}"
            return row.owner, "current_email" if row.rank == 1 else "previous_email", None
        return guest_key(row.normalized), "guest_email", None

    routed = [route(r) for r in identifiers.itertuples(index=False)]
    identifiers["person_key"] = [r[0] for r in routed]
    identifiers["rule"] = [r[1] for r in routed]
    identifiers["reason"] = [r[2] for r in routed]
    map_rows.append(
        pd.DataFrame(
            {
                "identifier_type": "email",
                "identifier": identifiers["email"],
                "normalized": identifiers["normalized"],
                "person_key": identifiers["person_key"],
                "rule": identifiers["rule"],
                "reason": identifiers["reason"],
            }
        )
    )
    identity_map = pd.concat(map_rows, ignore_index=True)

    # --- guest people ----------------------------------------------------------------------
    seen = seen.merge(identifiers[["email", "person_key", "rule"]], on="email", how="left")
    guests = seen[seen["rule"] == "guest_email"].groupby("normalized", as_index=False)["first_seen_at"].min()
    people_guest = pd.DataFrame(
        {
            "person_key": guests["normalized"].map(guest_key),
            "person_type": "guest",
            "customer_id": None,
            "email": guests["normalized"],
            "cio_identifier_type": "email",
            "cio_identifier": guests["normalized"],
            "first_name": None,
            "last_name": None,
            "email_consent": False,
            "sms_consent": False,
            "created_at": guests["first_seen_at"],
            "deleted_at": pd.NaT,
            "email_shared": False,
        }
    )
    people = pd.concat([people_acc, people_guest], ignore_index=True)[PEOPLE_COLUMNS]

    # --- merges: guest activity under an email before the account held it -------------------
    to_account = seen[seen["rule"].isin(["current_email", "previous_email"])]
    to_account = to_account.groupby(["person_key", "normalized"], as_index=False)["first_seen_at"].min()
    acquired = email_acquired_at(accounts, email_changes)
    created = accounts.set_index("customer_id")["created_at"]
    to_account["email_acquired_at"] = pd.to_datetime(
        [acquired.get((c, e), created.get(c)) for c, e in zip(to_account["person_key"], to_account["normalized"])], utc=True
    )
    to_account["first_seen_at"] = pd.to_datetime(to_account["first_seen_at"], utc=True)
    early = to_account[to_account["first_seen_at"] < to_account["email_acquired_at"]]
    merges = pd.DataFrame(
        {
            "merge_id": [
                "merge_" + hashlib.sha256(f"{p}\x00{e}".encode()).hexdigest()[:24]
                for p, e in zip(early["person_key"], early["normalized"])
            ],
            "primary_id": early["person_key"].to_numpy(),
            "secondary_email": early["normalized"].to_numpy(),
            "guest_first_seen_at": early["first_seen_at"].to_numpy(),
            "email_acquired_at": early["email_acquired_at"].to_numpy(),
        }
    ).sort_values("merge_id", ignore_index=True)

    return Identities(identity_map=identity_map[IDENTITY_MAP_COLUMNS], people=people, merges=merges[MERGE_COLUMNS])
