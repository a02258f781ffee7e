"""The dashboard: pages and htmx partials for jobs, endpoints, usage, the team and API tokens."""
