"""The RunPod handler, where RunPod Hub looks for it (`.runpod/handler.py`).

The container does not start here: its CMD, scripts/bootstrap.sh, prepares the workspace and
warms the model before it runs the same worker (`python -m da3_serverless.runpod_worker`).
Running this file directly starts that worker without the bootstrap steps.
"""

from da3_serverless.runpod_worker import main

if __name__ == "__main__":
    main()
