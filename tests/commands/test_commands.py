"""The command registry and ``/customer/add``'s argument checks and upsert merging."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from worker.commands import CommandError, Context, customer_add, lookup, provider_add, space_info
from worker.commands.customer_add import AddArguments, details_json, parse_arguments

GOOD: dict[str, Any] = {
    "customer": "did:plc:abc",
    "product": "did:web:hilt.fil-forge.com",
    "details": {"external_id": "x", "region": "eu"},
}


def test_registry_maps_the_command_to_its_module() -> None:
    found: dict[str, object] = {c: lookup(c) for c in ("/customer/add", "/provider/add")}
    found["/space/info"] = lookup("/space/info")
    assert found == {
        "/customer/add": customer_add,
        "/provider/add": provider_add,
        "/space/info": space_info,
    }
    assert lookup("/customer/remove") is None


def test_good_arguments_parse_and_unknown_keys_are_ignored() -> None:
    args = parse_arguments({**GOOD, "externalAccount": "stripe:cus_1", "future": 1})
    assert args == AddArguments(
        "did:plc:abc", "did:web:hilt.fil-forge.com", GOOD["details"], "stripe:cus_1"
    )
    assert parse_arguments({**GOOD, "externalAccount": None}).external_account is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "expected a map"),
        ({k: v for k, v in GOOD.items() if k != "customer"}, "customer: missing"),
        ({**GOOD, "customer": None}, "customer: expected text"),
        ({**GOOD, "customer": "alice"}, "customer: expected a DID"),
        ({**GOOD, "product": "did:web"}, "product: expected a DID"),
        ({k: v for k, v in GOOD.items() if k != "details"}, "details: missing"),
        ({**GOOD, "details": None}, "details: expected a map"),
        ({**GOOD, "details": {"a": 1}}, "details: expected text to text"),
        ({**GOOD, "details": {"a": "b\x00"}}, "NUL"),
        ({**GOOD, "externalAccount": 5}, "externalAccount: expected text"),
    ],
)
def test_malformed_arguments_name_the_field(args: object, fragment: str) -> None:
    with pytest.raises(CommandError) as err:
        parse_arguments(args)
    assert err.value.name == "MalformedArguments"
    assert err.value.message.startswith("malformed arguments: ")
    assert fragment in err.value.message


def test_the_subject_must_be_the_service() -> None:
    inv: Any = SimpleNamespace(sub="did:key:zOther", args=GOOD)
    with pytest.raises(CommandError) as err:
        customer_add.prepare(inv, Context("did:web:upload.example"))
    assert err.value.name == "InvalidCustomerSubject"
    ok: Any = SimpleNamespace(sub="did:web:upload.example", args=GOOD)
    assert customer_add.prepare(ok, Context("did:web:upload.example")).customer == "did:plc:abc"


def test_details_are_a_json_object_or_null() -> None:
    assert details_json({}) is None
    assert details_json({"region": "eu", "a": "b"}) == '{"a": "b", "region": "eu"}'
