"""JSON bodies of the wire protocol, as Pydantic models (they also make the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AnswerProbsRequest",
    "AnswerProbsResponse",
    "BinaryHeader",
    "BinaryItem",
    "Capabilities",
    "ErrorBody",
    "ErrorResponse",
    "HealthResponse",
    "InfoResponse",
    "Item",
    "Limits",
]


class Item(BaseModel):
    """One input: an image and a question."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        description="Base64 of a PNG, a JPEG, or a NumPy .npy file holding an H x W x 3 "
        "uint8 or float32 array on the 0-255 scale (a data: URL prefix is allowed)."
    )
    question: str = Field(description="The question, passed to the model as it is.")


class AnswerProbsRequest(BaseModel):
    """``POST /v1/answer_probs``: a batch of inputs."""

    model_config = ConfigDict(extra="forbid")

    items: list[Item] = Field(description="The inputs, at most limits.max_batch of them.")


class BinaryItem(BaseModel):
    """One input of a binary batch: its question and the length of its image file."""

    model_config = ConfigDict(extra="forbid")

    question: str
    image_bytes: int = Field(ge=0, description="Length of this item's image file in bytes.")


class BinaryHeader(BaseModel):
    """The JSON line that starts a binary batch body."""

    model_config = ConfigDict(extra="forbid")

    items: list[BinaryItem]


class AnswerProbsResponse(BaseModel):
    """Scores ``[B][A]``: row ``i`` for item ``i``, column ``j`` for ``answers[j]``."""

    scores: list[list[float]] = Field(
        description="One row per item, one finite non-negative score per answer."
    )
    answers_sha256: str = Field(
        description="SHA-256 (hex) of the answers joined by a newline, UTF-8; lets the "
        "client check the columns still mean what /v1/info said."
    )


class Limits(BaseModel):
    """What the server refuses: larger bodies and batches get 413, larger images 422."""

    max_batch: int
    max_body_bytes: int
    max_pixels: int


class Capabilities(BaseModel):
    """What the model behind the server supports."""

    answer_probs: bool = True
    gradients: bool = False
    image_encodings: list[str]
    npy_dtypes: list[str]
    request_formats: list[str] = Field(
        description="Request bodies accepted: json (base64 images), binary (raw files)."
    )


class InfoResponse(BaseModel):
    """``GET /v1/info``."""

    protocol: str
    name: str
    answers: list[str]
    answers_sha256: str
    capabilities: Capabilities
    limits: Limits


class HealthResponse(BaseModel):
    """``GET /v1/health``."""

    status: str = "ok"


class ErrorBody(BaseModel):
    """What went wrong."""

    status: int
    code: str = Field(description="A stable machine-readable code, e.g. batch_too_large.")
    message: str


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    error: ErrorBody
