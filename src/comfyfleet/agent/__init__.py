"""Everything that runs on the GPU instance: downloads first, provisioning and ComfyUI later.

Importable without the control plane's dependencies (no FastAPI, no SQLAlchemy).
"""
