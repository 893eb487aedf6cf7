"""Using the exported model: `mnist-predict`, `mnist-serve` and its draw-a-digit page.

settings (no torch, no onnxruntime) · app (the ASGI app) · server (the `mnist-serve` command)
· predict (the `mnist-predict` command) · static/index.html (the page). None of them imports torch.
"""
