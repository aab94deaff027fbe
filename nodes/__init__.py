"""ComfyUI nodes of the pack: thin V3 adapters over the math in attention/, samplers/ and pose/."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import (consistory, consistory_injection, consistory_subject, cross_attention_mask, inversion, masactrl,
               masactrl_batch, particle_inpaint, pose_edit_outpaint, prompt_tokens, repaint, story_prompts)

NODES: list[type[io.ComfyNode]] = [
    masactrl.MasaCtrlAttentionPatch,
    masactrl_batch.MasaCtrlConditioningBatch,
    masactrl_batch.MasaCtrlLatentBatch,
    inversion.InvertLatent,
    inversion.MasaCtrlInvertedSource,
    repaint.RePaintKSampler,
    repaint.RePaintSampler,
    particle_inpaint.ParticleInpaintKSampler,
    particle_inpaint.ParticleInpaintSampler,
    pose_edit_outpaint.PoseEditOutpaint,
    prompt_tokens.PromptTokenIndices,
    cross_attention_mask.CrossAttentionMask,
    consistory.ConsiStoryAttentionPatch,
    consistory_injection.ConsiStoryFeatureInjection,
    consistory_subject.ConsiStorySaveSubject,
    consistory_subject.ConsiStoryLoadSubject,
    story_prompts.StoryPrompts,
]


class ConsistentSynthesisExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
