"""Moved: the serving core is server/core/ (http: bodies and streaming answers; streams; serving).

Kept only so that route modules written against the old path keep importing;
new code imports from server.core. `check_params` is now only the
model-dependent check: SamplingParams validates everything else when made.
"""

from typing import Mapping

from server.core.http import (  # noqa: F401
    SSE_HEADERS,
    CancellingStreamingResponse,
    collect_unless_disconnected,
    log_unknown_fields,
    new_id,
    parse_body,
)
from server.core.pieces import TokenPieces  # noqa: F401
from server.core.serving import api_field_names, check_context, remaining_context  # noqa: F401
from server.core.streams import AdmittedStream, add_usage, close_all, merge_streams, start_all, start_generation  # noqa: F401
from server.engine.types import SamplingParams


def check_params(params: SamplingParams, vocab_size: int, api_names: Mapping[str, str] | None = None) -> None:
    with api_field_names(api_names or {}):
        params.check_against(vocab_size)
