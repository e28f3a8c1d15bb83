"""Hypothesis strategies for hostile message values, shared by the fault tests."""

from __future__ import annotations

import json
import random

from hypothesis import strategies as st

from horizons_bench.faults import poison

ENVELOPE_KEYS = ("event_id", "event_type", "job_id", "occurred_at", "producer", "payload")

# Text including lone surrogates: json.dumps writes them as "\ud800" escapes, which
# the stdlib parser accepts and UTF-8 stores reject (a bug class found by this suite).
text = st.text(max_size=30) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=10
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(ENVELOPE_KEYS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=25,
)
# A real lifecycle event with one thing made wrong (field dropped, wrong type, …).
broken_events = st.integers(0, 2**32).map(lambda seed: poison.broken_event(random.Random(seed)))
payloads = (
    st.binary(max_size=3000) | json_values.map(lambda v: json.dumps(v).encode()) | broken_events
)
