"""Container tooling: the engine behind `docker compose` (engine.py), stand-ins for the upstream
base images where no registry answers (standins.py), podman's settings for these machines
(containers.conf), and the load tester image's entrypoint (loadtest_entrypoint.py)."""
