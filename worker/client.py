"""The producer's Python API, at the import path producers already use.

Everything here is :mod:`worker.produce.client`; see it for the documentation.
"""

from worker.produce.client import (
    CUSTOMER_ADD,
    DEFAULT_LIFETIME,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    Client,
    ClientError,
    CustomerAdd,
    InvalidReceipt,
    Outcome,
    ProofError,
    PublishFailed,
    ReceiptError,
    ReceiptTimeout,
    SignedRequest,
    build_customer_add,
    command_covers,
    load_proofs,
    proof_chain,
    reply_queue_arguments,
    reply_queue_name,
    verify_response,
)

__all__ = [
    "CUSTOMER_ADD",
    "DEFAULT_LIFETIME",
    "DEFAULT_QUEUE",
    "DEFAULT_TIMEOUT",
    "Client",
    "ClientError",
    "CustomerAdd",
    "InvalidReceipt",
    "Outcome",
    "ProofError",
    "PublishFailed",
    "ReceiptError",
    "ReceiptTimeout",
    "SignedRequest",
    "build_customer_add",
    "command_covers",
    "load_proofs",
    "proof_chain",
    "reply_queue_arguments",
    "reply_queue_name",
    "verify_response",
]
