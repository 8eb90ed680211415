"""editserve: image editing with Prompt-to-Prompt and InstructPix2Pix over HTTP — the SDK and contract.

    from editserve import Client
    client = Client("http://127.0.0.1:8000", api_key="esk_...")
    edit = client.wait(client.submit_p2p("a cat on a bike", "a dog on a bike").id)
"""

from editserve import errors
from editserve.client import AsyncClient, Client
from editserve.contract import (
    AttentionMapResult,
    Edit,
    EditList,
    EditRequest,
    EditStatus,
    ErrorInfo,
    IP2PEditRequest,
    LocalBlend,
    ModelInfo,
    P2PEditRequest,
    Progress,
    ResultImage,
    RunMetrics,
    Sweep,
    WebhookDeliveryState,
    WebhookEvent,
    WebhookEventType,
    WebhookSpec,
)
from editserve.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EditCanceled,
    EditFailed,
    EditserveError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    UnsupportedMediaTypeError,
    WaitTimeout,
    WebhookVerificationError,
)
from editserve.webhooks import generate_secret
from editserve.webhooks import verify as verify_webhook

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AttentionMapResult", "AuthenticationError",
    "BadRequestError", "Client", "ConflictError", "Edit", "EditCanceled", "EditFailed", "EditList", "EditRequest",
    "EditStatus", "EditserveError", "ErrorInfo", "IP2PEditRequest", "InvalidRequestError", "LocalBlend",
    "ModelInfo", "NotFoundError", "P2PEditRequest", "PayloadTooLargeError", "PermissionDeniedError", "Progress",
    "RateLimitError", "ResultImage", "RunMetrics", "ServerError", "ServiceUnavailableError", "Sweep",
    "UnsupportedMediaTypeError", "WaitTimeout", "WebhookDeliveryState", "WebhookEvent", "WebhookEventType",
    "WebhookSpec", "WebhookVerificationError", "errors", "generate_secret", "verify_webhook",
]
