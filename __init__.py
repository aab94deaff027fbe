"""Consistent image synthesis for ComfyUI: MasaCtrl, RePaint and pose-edited outpainting.

ComfyUI's custom-node loader imports this file and calls ``comfy_entrypoint``. The node
modules import ComfyUI, so they are loaded only when the host asks for them: the math in
``attention/`` and ``samplers/`` stays importable without a host.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import ConsistentSynthesisExtension

    return ConsistentSynthesisExtension()
