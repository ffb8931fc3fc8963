"""Fast tests of the Flower glue (fedrg/flower): record layout, the ClientApp's handlers and
state, and GridTransport, with real Flower Messages, Contexts and RecordDicts and the real
hospital-side secure-aggregation stages. No Ray: a small in-process grid delivers each
message to the real ClientApp, the way Flower's engines do (tests/test_simulation_e2e.py
runs the same apps on Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedrg.config import SiteConfig, load_config
from fedrg.errors import FedrgError
from fedrg.federated.secure import SecureAggregationDriver
from fedrg.flower.apps import ERROR_CODE, _load_state, _save_state, build_client_app
from fedrg.flower.records import payload_to_record, record_to_payload
from fedrg.flower.transport import ACTIONS, GridTransport
from fedrg.payload import Payload

# ------------------------------------------------------------------ records

_meta_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=4),
    max_leaves=12,
)
_arrays = st.dictionaries(
    st.text(alphabet="abcdefgh.0123456789", min_size=1, max_size=12),
    hnp.arrays(dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.uint32]),
               shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
    max_size=4,
)


@settings(max_examples=60)
@given(meta=st.dictionaries(st.text(min_size=1, max_size=10), _meta_values, max_size=5),
       arrays=_arrays)
def test_payload_survives_the_record_round_trip(meta, arrays) -> None:
    back = record_to_payload(payload_to_record(Payload(meta=meta, arrays=arrays)))
    assert back.meta == meta
    assert set(back.arrays) == set(arrays)
    for k, a in arrays.items():
        assert back.arrays[k].dtype == a.dtype and back.arrays[k].shape == a.shape
        np.testing.assert_array_equal(back.arrays[k], a)


def test_node_state_round_trips_through_context_state() -> None:
    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    state = Payload(meta={"pending_weight": 12.5, "secagg_session": b"\x00\x01key"})
    state.put_array_list("pending", [np.arange(6, dtype=np.float32).reshape(2, 3)])
    _save_state(ctx, state)
    back = _load_state(ctx)
    assert back.meta == state.meta
    np.testing.assert_array_equal(back.array_list("pending")[0], state.array_list("pending")[0])


def test_all_arrays_of_a_message_travel_as_one_flower_array() -> None:
    # Flower stores and moves each Array as its own object (one request per object and hop):
    # an adapter's ~50 tensors go as one packed array, and the state is kept the same way
    p = Payload(meta={"round": 1})
    p.put_array_list("global", [np.full((3, 4), i, dtype=np.float32) for i in range(50)])
    record = payload_to_record(p)
    assert list(record["arrays"].keys()) == ["packed"]
    back = record_to_payload(record)
    assert [a.tolist() for a in back.array_list("global")] == [a.tolist() for a in p.array_list("global")]
    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    _save_state(ctx, p)
    assert len(ctx.state["fedrg_state_arrays"]) == 1
    assert _load_state(ctx).meta == p.meta


@pytest.mark.parametrize("layout", [
    '[["a","<f4",[4],0,16]]',  # 16 bytes claimed, 8 in the buffer
    '[["a","<f4",[3],0,8]]',  # size does not match the shape
    '[["a","|O",[1],0,8]]',  # object dtype: never unpacked
    '[["a","<f4",[-2],0,8]]',  # negative shape
    '[["a","<f4",[1],6,4]]',  # runs past the end
    '[["a","<f4",[1],0,4],["a","<f4",[1],4,4]]',  # a name twice
    '{"a": 1}',  # not a list
    'not json',
])
def test_a_hostile_packed_layout_is_refused(layout) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedrg.flower.records import RecordLayoutError

    content = RecordDict({"arrays": ArrayRecord(array_dict={"packed": Array(np.zeros(8, np.uint8))}),
                          "meta": ConfigRecord({"json": "{}", "packed_layout": layout})})
    with pytest.raises(RecordLayoutError, match="malformed packed arrays"):
        record_to_payload(content)


# ------------------------------------------------------------------ ClientApp + GridTransport

class InProcessGrid:
    """Delivers real Flower Messages to a real ClientApp, one Context per node (as the
    simulation engine does), and returns the real reply Messages."""

    def __init__(self, app, nodes: list[int], silent: set[int] | None = None) -> None:
        self.app = app
        self.contexts = {n: Context(run_id=7, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in nodes}
        self.silent = silent or set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Flower's Grid contract: ids back; the ClientApp answers at once (kept for pull)."""
        from uuid import uuid4

        ids = []
        self.waiting = getattr(self, "waiting", {})
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's in-memory grid
            self.sent.append(msg)
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id not in self.silent:
                reply = self.app(message=msg, context=self.contexts[msg.metadata.dst_node_id])
                self.waiting[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        replies = [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]
        self.received += replies
        return replies


@pytest.fixture(autouse=True)
def _server_identity():
    """What Flower's ServerApp runtime sets before a ServerApp creates messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def _sites(tmp_path, nodes: list[int], broken: set[int] = frozenset()):
    """Each node a hospital with its long-term key, all pinning one roster."""
    from fedrg.federated.secure import provision_roster

    sites = dict(zip(nodes, provision_roster(
        [SiteConfig(name=f"h{n}", cohort="/unused", state_dir=str(tmp_path / f"h{n}"))
         for n in nodes], tmp_path / "roster.toml"), strict=True))

    def resolve(ctx: Context) -> SiteConfig:
        if ctx.node_id in broken:
            raise FedrgError("cohort /secret/hospital/path/manifest.csv is unreadable")
        return sites[ctx.node_id]
    return resolve


def _with_pending(grid: InProcessGrid, updates: dict[int, np.ndarray], weight: float) -> None:
    """Leave each node's state as its train handler does: the update, pending masking."""
    for node, update in updates.items():
        state = Payload(meta={"pending_weight": weight})
        state.put_array_list("pending", [update])
        _save_state(grid.contexts[node], state)


def test_every_action_reaches_its_handler_under_its_message_type(tmp_path) -> None:
    grid = InProcessGrid(build_client_app(_sites(tmp_path, [3])), [3])
    transport = GridTransport(grid, min_nodes=1, wait_for_nodes=0)
    for action in ("secagg_share", "secagg_masked", "secagg_consistency", "secagg_unmask"):
        (reply,) = transport.send(action, {3: Payload()}, round_=4).values()
        # each stage answered by the secure-aggregation handler (none has a session yet)
        assert not reply.ok and "without a secure-aggregation session" in reply.error
    assert [m.metadata.message_type for m in grid.sent] == [
        ACTIONS[a] for a in ("secagg_share", "secagg_masked", "secagg_consistency", "secagg_unmask")]
    assert {m.metadata.group_id for m in grid.sent} == {"4"}


def test_secure_round_over_flower_messages_gives_the_weighted_mean(tmp_path) -> None:
    nodes = [11, 12, 13]
    rng = np.random.default_rng(0)
    updates = {n: rng.uniform(-0.5, 0.5, size=40).astype(np.float32) for n in nodes}
    grid = InProcessGrid(build_client_app(_sites(tmp_path, nodes)), nodes)
    _with_pending(grid, updates, weight=5.0)
    cfg = load_config(None, ["federation.hospitals=3", "federation.min_hospitals=2"])
    transport = GridTransport(grid, min_nodes=2, wait_for_nodes=0)
    mean, total = SecureAggregationDriver(cfg)(transport, nodes, 1, 40)
    assert total == pytest.approx(15.0)
    np.testing.assert_allclose(mean, np.mean([updates[n] for n in nodes], axis=0), atol=1e-3)
    # the plain update left no node: what travelled back is masked
    masked = [record_to_payload(m.content).arrays.get("sa.masked") for m in grid.received]
    assert sum(m is not None for m in masked) == 3
    for m in grid.received:
        for arr in record_to_payload(m.content).arrays.values():
            for u in updates.values():
                assert arr.size != u.size or not np.allclose(arr.astype(np.float64), u)
    for node in nodes:
        assert not _load_state(grid.contexts[node]).arrays  # dropped after masking


def test_hospital_errors_reach_the_server_without_site_details(tmp_path) -> None:
    grid = InProcessGrid(build_client_app(_sites(tmp_path, [21, 22], broken={22})), [21, 22],
                         silent={23})
    transport = GridTransport(grid, min_nodes=1, wait_for_nodes=0)
    replies = transport.send("secagg_share", {21: Payload(), 22: Payload()}, round_=1)
    assert not replies[22].ok
    assert "/secret" not in replies[22].error and "manifest.csv" not in replies[22].error
    assert replies[21].error and "session" in replies[21].error
    assert ERROR_CODE == 4100
