"""Property-based fuzzing of safetensors_io's header validation (tests/support/fuzz.py):
arbitrary bytes, arbitrary JSON headers over claimed regions up to 2**70 bytes, mutations of a
valid file. Each parse succeeds consistently (and agrees with the safetensors library) or raises
CorruptCheckpointError, within a fixed allocation. A bounded, derandomised budget here;
``python -m bench.reliability`` runs the same properties with a large one."""

from __future__ import annotations

import pytest

from tests.support.fuzz import PROPERTIES, Property

EXAMPLES = 150


@pytest.mark.parametrize("prop", PROPERTIES, ids=[p.name for p in PROPERTIES])
def test_header_validation_only_accepts_consistent_files_or_raises_corrupt(prop: Property) -> None:
    examples, accepted = prop.run(EXAMPLES)
    assert examples == EXAMPLES
    if prop.name != "arbitrary-bytes":  # random bytes never form a header; the others do
        assert accepted > 0, "the strategy never reached the success path"
