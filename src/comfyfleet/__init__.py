"""comfyfleet: ComfyUI on rented Vast.ai GPUs."""

__version__ = "0.1.0"
