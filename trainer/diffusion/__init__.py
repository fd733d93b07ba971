"""Diffusion (DiT recipes): objectives, samplers, image data, evaluation of samples."""
