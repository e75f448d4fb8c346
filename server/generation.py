"""Moved: the serving core is server/core/ (http: bodies and streaming answers; streams; serving).

Kept only so that route modules written against the old path keep importing;
new code imports from server.core.
"""

from server.core.http import (  # noqa: F401
    SSE_HEADERS,
    CancellingStreamingResponse,
    collect_unless_disconnected,
    log_unknown_fields,
    new_id,
    parse_body,
)
from server.core.pieces import TokenPieces  # noqa: F401
from server.core.serving import check_context, remaining_context  # noqa: F401
from server.core.streams import AdmittedStream, close_all, merge_streams, start_all, start_generation  # noqa: F401
