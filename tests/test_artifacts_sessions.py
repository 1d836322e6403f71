"""The recommender's sessions file (stages.artifacts.sessions): damaged files refused naming the
damage."""

from __future__ import annotations

import json

import pytest

from stages.support.errors import TempflowError
from tests.conftest import _sessions_file


@pytest.mark.parametrize("damage, needle", [
    ("nulls", "a column holds nulls"), ("item_ids", "lacks the item ids"), ("unsorted", "not sorted by session"),
    ("schema", "this tempflow reads 'tempflow.recsys.sessions/1'"),
])
def test_damaged_sessions_are_refused(damage, needle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.artifacts.sessions import read_sessions

    data = _sessions_file(tmp_path)
    table = pq.read_table(data)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    if damage == "nulls":
        reward = pa.array([None] + table.column("reward").to_pylist()[1:], type=pa.float32())
        table = table.set_column(table.schema.get_field_index("reward"), "reward", reward)
    elif damage == "item_ids":
        meta["item_ids"] = 4
    elif damage == "unsorted":
        position = pa.array(table.column("position").to_pylist()[::-1], type=pa.int32())
        table = table.set_column(table.schema.get_field_index("position"), "position", position)
    else:
        meta["schema"] = "tempflow.recsys.sessions/0"
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta)}), data)
    with pytest.raises(TempflowError, match=needle):
        read_sessions(data)
