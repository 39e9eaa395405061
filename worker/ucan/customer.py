"""``/customer/add`` args exactly as libforge encodes them (``details`` in Go sort order)."""

from __future__ import annotations

from collections.abc import Mapping

from worker.ucan import cbor

CUSTOMER_ADD: str = "/customer/add"


def customer_add_args(
    customer: str,
    product: str,
    details: Mapping[str, str],
    external_account: str | None = None,
) -> bytes:
    """The args map of ``/customer/add`` byte for byte as libforge's cbor-gen writes it.

    Key order ``details``, ``product``, ``customer``, then ``externalAccount`` when given;
    ``details`` keys in Go ``sort.Strings`` order (plain bytewise, not length-first), so
    Hilt's ``{external_id, region}`` comes out ``external_id`` first. Not canonical
    DAG-CBOR on purpose: it is what Hilt signs.

    Raises:
        TypeError: a details key or value, or a DID, is not text.
    """
    for name, v in (("customer", customer), ("product", product)):
        if not isinstance(v, str):
            raise TypeError(f"cannot encode /customer/add args: {name} must be text")
    out = [cbor.head(5, 3 if external_account is None else 4), cbor.encode_text("details")]
    out.append(cbor.head(5, len(details)))
    for k in sorted(details, key=lambda s: s.encode()):
        v = details[k]
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError("cannot encode /customer/add args: details must map text to text")
        out.append(cbor.encode_text(k))
        out.append(cbor.encode_text(v))
    out += [cbor.encode_text("product"), cbor.encode_text(product)]
    out += [cbor.encode_text("customer"), cbor.encode_text(customer)]
    if external_account is not None:
        out += [cbor.encode_text("externalAccount"), cbor.encode_text(external_account)]
    return b"".join(out)
