"""Backend.live_tokens / kv_tokens: a plan made while batches decode sees the tokens they produced so far,
and the KV transfers a migration executes are sized for the caches as they are when it starts.

The simulator's backend, with the two hooks added here as a live backend answers them (it reports a
batch's tokens only when the batch stops): OPT-6.7B on two T4 instances, a forced config change
while requests decode (stopped at once), and a notice whose arranger lets them decode on first."""
from spotserve.controller.approach import get_approach
from spotserve.controller.controller import SERVING, Controller
from spotserve.controller.instances import InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy
from spotserve.controller.requests import RequestManager
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.planner.types import ParallelConfig
from spotserve.sim.backend import SimBackend

COST = load_cost("6.7B", PACKAGE_DATA)
PROMPT, OUT = 512, 64


class Reporting(SimBackend):
    """Answers live_tokens from the batch's closed-form progress, and kv_tokens as the live engine's
    cache holds them: prompt + generated - 1 positions (the last token sampled is not fed yet)."""

    def __init__(self, policy):
        super().__init__(policy)
        self.executed = []
        self.asked_live = 0

    def live_tokens(self, replica, batch_id):
        self.asked_live += 1
        b = self.batches.get(replica)
        if b is None or b.batch_id != batch_id:
            return {}
        return {p.request_id: q.committed + p.new_tokens for p, q in zip(b.progress(self.t), b.reqs)}

    def kv_tokens(self, request_id):
        q = self.controller.requests.requests[request_id]
        return q.input_len + q.committed - 1 if q.kv_ready else None

    def execute_plan(self, plan, plan_id, stall_s, keep=None):  # with the caches' sizes at that time
        self.executed.append((plan, {t.request: self.kv_tokens(int(t.request)) for t in plan.transfers
                                     if t.tensor == "kv"}))
        super().execute_plan(plan, plan_id, stall_s, keep)


def cluster(instances=("a", "b", "c")):
    pol = Policy(COST)
    im = InstanceManager(InstanceConfig(gpus_per_instance=2, gpu_memory_bytes=COST.gpu_memory_bytes, grace_s=3.0))
    ctl = Controller(pol, get_approach("spotserve"), im, RequestManager(max_seq_len=2049), rate=0.5)
    be = Reporting(pol)
    be.attach(ctl)
    seen = []
    plan = pol.plan

    def spy(gpus, rate, current, running, *a, **kw):  # what the planner sees, and what the controller was told
        seen.append((list(running), {q.request_id: ctl.requests.requests[int(q.request_id)].committed
                                     for q in running}))
        return plan(gpus, rate, current, running, *a, **kw)
    pol.plan = spy
    for name in instances:
        ctl.on_instance_added(name)
    run_until(be, 0.0)
    return ctl, be, seen


def run_until(be, t):
    while be.next_time() <= t:
        be.step()
    be.t = max(be.t, t)


def decode(ctl, be, steps: int) -> None:
    t = be.now()
    for rid in range(4):
        ctl.on_arrival(rid, PROMPT, OUT)
    shape = ctl.plan.config
    run_until(be, t + ctl.policy.prefill_s(shape, 4, PROMPT) + (steps + 0.5) * ctl.policy.step_s(shape, 4))


def kv_bytes_by_request(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in plan.transfers:
        if t.tensor == "kv":
            out[t.request] = out.get(t.request, 0) + t.nbytes
    return out


def check_sizes(ctl, executed) -> None:
    """Each KV transfer carries its slice of the cache the backend reported when the plan was executed."""
    plan, cached = executed
    per_token = ctl.policy.cost.kv_bytes_per_token_layer
    for t in plan.transfers:
        if t.tensor == "kv":
            lo, hi, den = t.slice or (0, 1, 1)
            assert t.nbytes == round((hi - lo) * cached[t.request] * per_token / den)


def test_forced_change_plans_with_the_tokens_decoded_so_far():
    ctl, be, seen = cluster(("a", "b"))
    decode(ctl, be, steps=10)
    target = next(c for c in (ParallelConfig(1, 2, 2, 4), ParallelConfig(2, 1, 2, 4)) if c != ctl.plan.config)
    assert ctl.reconfigure(target) is True
    run_until(be, be.now())  # the plan is made now; the batches stop at their next step boundary
    running, told = seen[-1]
    assert running and set(told.values()) == {0}  # the backend reports a batch's tokens when it stops
    for q in running:  # what the planner saw: the tokens decoded so far
        assert q.committed >= 10 and q.tokens == PROMPT + q.committed and q.remaining == OUT - q.committed
    run_until(be, be.now() + 600.0)
    assert ctl.phase == SERVING and ctl.plan.config == target
    moved = kv_bytes_by_request(be.executed[-1][0])
    assert moved, "the forced change should move KV caches"
    check_sizes(ctl, be.executed[-1])
    assert all(q.state == "completed" and q.committed == OUT for q in ctl.requests.requests.values())


def test_notice_drain_moves_the_cache_grown_after_the_plan():
    ctl, be, seen = cluster()
    decode(ctl, be, steps=5)
    served = {g.split("/")[0] for g in ctl.plan.placement.values()}
    victim = sorted(served)[0]
    n_plans = len([e for e in ctl.log.events if e["event"] == "plan"])
    ctl.on_notice(victim, be.now() + 3.0)  # too soon for every request to finish first
    run_until(be, be.now())
    plan_ev = [e for e in ctl.log.events if e["event"] == "plan"][n_plans]
    assert plan_ev["migrate_at"] > be.now()  # the arranger lets the batches decode on first
    planned = kv_bytes_by_request(ctl.pending[1])
    planned_tokens = {q.request_id: q.tokens for q in seen[-1][0]}
    run_until(be, plan_ev["migrate_at"] + 1e-6)
    executed = be.executed[-1]
    moved = kv_bytes_by_request(executed[0])
    assert moved and set(moved) <= set(planned)
    check_sizes(ctl, executed)
    for rid, nbytes in moved.items():  # the same slices, each grown with its cache
        now_tokens = executed[1][rid]
        assert now_tokens > planned_tokens[rid]
        assert nbytes * planned_tokens[rid] == planned[rid] * now_tokens
    run_until(be, be.now() + 600.0)
    assert all(q.state == "completed" and q.committed == OUT for q in ctl.requests.requests.values())
