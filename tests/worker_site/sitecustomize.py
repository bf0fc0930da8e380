"""Run in every Python process started with this folder on PYTHONPATH (Python imports sitecustomize at start):
calls the function RAYTRAIN_WORKER_HOOK names ("module.function"). Ray applies a runtime environment's
worker_process_setup_hook only at the job level, so a test sharing one Ray instance hands its Ray Train workers
a hook this way (env_vars in their runtime environment)."""
import importlib
import os

if os.environ.get("RAYTRAIN_WORKER_HOOK"):
    module, function = os.environ["RAYTRAIN_WORKER_HOOK"].rsplit(".", 1)
    getattr(importlib.import_module(module), function)()
    if os.environ.get("RAYTRAIN_HOOKED"):  # where the test sees that it ran: a file per process
        open(os.path.join(os.environ["RAYTRAIN_HOOKED"], str(os.getpid())), "w").close()
