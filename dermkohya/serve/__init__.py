"""`dermkohya serve`: an HTTP API, a job queue and a web UI over one project (the `serve` extra).

app.py builds the FastAPI application; api.py reads runs, artifacts, plans, synthetic sets and reports;
requests.py checks job requests and turns them into CLI commands; jobs.py keeps and runs the queue;
security.py decides who may ask and which files may leave; pages.py renders the web UI.
"""
