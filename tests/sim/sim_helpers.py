"""Stand-ins shared by the simulator backend tests: a policy with fixed latencies and a controller that records what the backend reports."""


class FixedPolicy:
    def prefill_s(self, shape, n, prompt):
        return 2.0

    def step_s(self, shape, n):
        return 0.5


class Recorder:
    def __init__(self):
        self.done = []

    def attach(self, backend):
        self.backend = backend

    def on_batch_done(self, replica, batch_id, progress, stopped=False):
        self.done.append((self.backend.now(), replica, batch_id, {p.request_id: p for p in progress}, stopped))

    def on_plan_done(self, plan_id):
        self.done.append((self.backend.now(), "plan", plan_id))
