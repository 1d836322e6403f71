"""The recommender's loaders (stages.recsys.data): RetailRocket, YOOCHOOSE and the MovieLens file of
the recbole wheel, sessions split at gaps, bad rows and files refused naming the line."""

from __future__ import annotations

import numpy as np
import pytest

from stages.recsys.data import PrepareConfig, PrepareFiles, build_sessions, read_events, read_movielens, split_by_gap
from stages.support.errors import TempflowError
from tests.conftest import MINUTE, _retailrocket


def test_retailrocket_sessions_split_at_30_minute_gaps(tmp_path):
    rows = [f"{0 * MINUTE},7,view,100,", f"{10 * MINUTE},7,addtocart,101,", f"{20 * MINUTE},7,transaction,101,5",
            f"{51 * MINUTE},7,view,102,",  # 31 minutes later: a new session
            f"{52 * MINUTE},7,view,100,", f"{53 * MINUTE},7,view,103,",
            f"{5 * MINUTE},8,view,100,", f"{6 * MINUTE},8,view,104,", f"{7 * MINUTE},8,transaction,104,6"]
    config = PrepareConfig(source="retailrocket", split="time", min_session_length=3)
    sessions = build_sessions(read_events(config, PrepareFiles(source=config.source, events=_retailrocket(tmp_path, rows))), config)
    assert sessions.info["sessions"] == 3 and sessions.info["purchases"] == 2
    bounds = sessions.bounds()
    first = [sessions.item_ids[i - 1] for i in sessions.item[bounds[0]:bounds[1]]]
    assert first == ["100", "101", "101"]  # visitor 7's first visit, in time order
    np.testing.assert_allclose(sessions.reward[bounds[0]:bounds[1]], [0.2, 0.2, 1.0])


@pytest.mark.parametrize("row, needle", [
    ("1000,7,like,100,", "line 2: unknown event 'like'"),
    ("1000,7,view,100", "line 2: expected 5 comma-separated fields, got 4"),
    ("soon,7,view,100,", "line 2: timestamp 'soon' is not a number"),
    ("1000,,view,100,", "line 2: empty visitorid or itemid"),
])
def test_retailrocket_bad_rows_are_refused_naming_the_line(row, needle, tmp_path):
    config = PrepareConfig(source="retailrocket")
    with pytest.raises(TempflowError, match=needle):
        read_events(config, PrepareFiles(source=config.source, events=_retailrocket(tmp_path, [row])))


def test_yoochoose_clicks_and_buys(tmp_path):
    clicks = tmp_path / "clicks.dat"
    clicks.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n"
                      "1,2014-04-07T10:54:46.998Z,214536506,0\n2,2014-04-07T13:56:37.614Z,214662742,0\n")
    buys = tmp_path / "buys.dat"
    buys.write_text("1,2014-04-07T10:55:00.000Z,214536500,1046,1\n")
    config = PrepareConfig(source="yoochoose", split="time", min_session_length=2)
    sessions = build_sessions(read_events(config, PrepareFiles(source=config.source, clicks=clicks, buys=buys)), config)
    assert sessions.info == {**sessions.info, "sessions": 1, "sessions_dropped_short": 1, "purchases": 1}
    assert sessions.purchase.tolist() == [False, False, False, True]  # the buy comes last in time
    with pytest.raises(TempflowError, match="buys.dat line 1: expected 5 comma-separated fields, got 4 .is this the buys"):
        buys.write_text("1,2014-04-07T10:55:00.000Z,214536500,0\n")
        read_events(config, PrepareFiles(source=config.source, clicks=clicks, buys=buys))


def test_movielens_from_the_recbole_wheel():
    config = PrepareConfig()
    events = read_movielens(config)
    assert len(events.item) == 100_000 and len(set(events.session)) == 943 and len(set(events.item)) == 1682
    sessions = build_sessions(events, config)
    assert sessions.n_items == 1682 and sessions.info["sessions"] == 943
    bounds = sessions.bounds()
    split = sessions.split[bounds[0]:bounds[1]]
    assert split[-1] == 2 and split[-2] == 1 and (split[:-2] == 0).all()  # leave-last-out
    times = sessions.time[bounds[0]:bounds[1]]
    assert (np.diff(times) >= 0).all()
    text = _ml_text()
    ratings = [float(line.split("\t")[2]) for line in text.splitlines()[1:]]
    assert sessions.purchase.sum() == sum(r >= 4 for r in ratings) == 55_375  # purchase: rating >= 4
    every = sessions.split[:]
    assert (every == 2).sum() == (every == 1).sum() == 943  # one test and one validation event per user


def _ml_text() -> str:
    from stages.recsys.data import _movielens_text

    return _movielens_text()


def test_movielens_bad_rows(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    with pytest.raises(TempflowError, match="line 2: rating 'five' is not a number"):
        read_movielens(PrepareConfig(), header + "1\t2\tfive\t3\n")
    with pytest.raises(TempflowError, match="line 2: expected 4 tab-separated fields, got 3"):
        read_movielens(PrepareConfig(), header + "1\t2\t5\n")
    with pytest.raises(TempflowError, match="no events in it"):
        read_movielens(PrepareConfig(), header)


def test_a_source_refuses_files_it_does_not_read(tmp_path):
    with pytest.raises(TempflowError, match="rec prepare: --events must be given with --source retailrocket, got None"):
        PrepareFiles(source="retailrocket")
    with pytest.raises(TempflowError, match="rec prepare: --events must be left out with --source movielens"):
        PrepareFiles(events=tmp_path)
    with pytest.raises(TempflowError, match="--buys must be given with --source yoochoose"):
        PrepareFiles(source="yoochoose", clicks=tmp_path)


def test_split_by_gap_counts_each_visitor_apart():
    from stages.recsys.data import Events

    events = Events()
    for visitor, stamp in (("a", 0), ("b", 10), ("a", 100), ("a", 5000)):
        events.add(visitor, "x", False, stamp)
    assert split_by_gap(events, 1800).session == ["a#0", "a#0", "a#1", "b#2"]


def test_an_unreadable_csv_names_its_line(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(b"timestamp,visitorid,event,itemid,transactionid\n1000,7,view,\xff\xfe,\n")
    with pytest.raises(TempflowError, match="line 2: not UTF-8 text"):
        read_events(PrepareConfig(source="retailrocket"), PrepareFiles(source="retailrocket", events=path))
