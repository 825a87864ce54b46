"""Work per student spread round CUDA side streams: the loop routes' students (fastagg.engine) and
the dense routes' convolutions (fastagg.ops.dense_conv)."""

from __future__ import annotations

import torch


def round_streams(K, streams, body, device=None):
    """``body(k)`` for k < K, student k on ``streams[k % len(streams)]``: forked from the current
    stream and joined back, so that what body writes into tensors made before the call is ordered
    before what the current stream does next, and body's own temporaries live and die on its
    stream (what outlives a student must be allocated before the call). Without streams (a CPU),
    one after the other on the current stream. Capturable in a CUDA graph."""
    if not streams:
        for k in range(K):
            body(k)
        return
    main = torch.cuda.current_stream(device)
    for st in streams:  # fork: each side stream after what the current one holds so far
        st.wait_stream(main)
    for k in range(K):
        with torch.cuda.stream(streams[k % len(streams)]):
            body(k)
    for st in streams:  # join
        main.wait_stream(st)
