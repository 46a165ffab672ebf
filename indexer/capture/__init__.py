"""Gradient capture: which parameters are traced (blocks), their exact per-example gradients by the
fastest route proven right (routes), kept factored where cheaper (grads), and the self-check against
per-example autograd (selfcheck); activation checkpointing run plainly while capturing
(plain_checkpoints).
"""
