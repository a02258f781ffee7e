"""The live engine: slices that send a job's requests, leases, rate limits, upstream rules, django-q2 tasks."""
