"""``emguard serve``: an OpenAI-compatible fine-tuning service with emguard's safety pipeline in every job.

app.py, routes_*.py   the HTTP API (FastAPI): files, fine-tuning jobs, models, chat completions
db.py, jobs.py        the state (SQLAlchemy; SQLite or PostgreSQL) and its state changes
worker.py             claims jobs with a lease and runs them in its own process
pipeline.py           one job: check -> screen -> train -> evaluate -> card -> release or hold
policy.py, card.py    the provider's policy and the safety card
store.py, keys.py     uploaded files by content hash; API keys per organisation
serving.py            released models for chat completions
"""
