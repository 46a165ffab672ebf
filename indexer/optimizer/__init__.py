"""The step the optimizer took: per-parameter learning rates and diagonal preconditioners.

TracIn is the first-order effect of the step the optimizer took on a training example z (Pruthi et al.,
2020). Per parameter coordinate that step is -lr_g * Gamma * g(z) for the parameter group g it belongs to,
with Gamma = 1 for SGD and Gamma = 1 / (sqrt(v_hat) + eps) for Adam / AdamW (v_hat the bias-corrected
second moment saved with the checkpoint), RMSprop and Adagrad. The score of a training example z for a
query z' at checkpoint i is then sum_g lr_{i,g} <grad l(w_i, z'), Gamma_i (.) grad l(w_i, z)>.

  state   reads the optimizer state saved with a checkpoint (tracin checkpoints, PyTorch training dicts,
          Lightning `optimizer_states`, Hugging Face Trainer `checkpoint-N/` folders: optimizer.pt +
          trainer_state.json) and maps its parameter groups to the model's parameter names
  step    turns it into `StepWeights`: w = lr_g * Gamma per traced parameter (the formula, its source,
          bounds), written into the index directory so the service weighs a query exactly as the index
"""
