"""Remote and hybrid jobs: the endpoint's own Files + Batches API instead of the slice loop.

The rooms, in the order a chunk meets them:
- poller.py: the poll loop, and one round of a job (plan, switch, a step per chunk due, the end);
- plan.py: pending items into chunks (RemoteBatch rows holding their items);
- steps.py: what each chunk status asks for next (send, look, cancel, collect), and what a failed call means;
- claims.py: one poller per chunk at a time (a compare-and-set claim, renewed before long calls);
- batchapi.py: the Files and Batches calls, no database; SDK errors come back as verdicts;
- budgets.py: the endpoint's enqueued-token limit, and money (cost cap, monthly limits);
- collect.py: result files joined to the items, and the rest settled by the batch's status;
- hybrid.py: the switch to live before a deadline;
- rounds.py: what a round reads once (the job, its endpoint, SDK clients, prices).

Every change to an item and to the job's counters goes through the ledger (jobs/models/ledger.py).
"""

from jobs.engine.remote.poller import poll, poll_round

__all__ = ["poll", "poll_round"]
