#!/usr/bin/env bash
# EDGE-GRPO (entropy-driven advantage) on verl 0.9.1 with edge-kernels' loss and fused log-prob/entropy kernel.
#
#   pip install 'edge-kernels[verl]'
#
# Installing edge-kernels is enough: its `verl.plugins` entry point makes `import verl` (in the driver and in
# every Ray worker) register the edge_* advantage estimators and policy losses. From a source checkout that is
# not pip-installed, use verl's documented alternative instead:
#   export VERL_USE_EXTERNAL_MODULES=edge_kernels.integrations.verl
#
# The one-key change from a GRPO run is `algorithm.adv_estimator=edge_eda` (or edge_grpo / edge_egpo /
# edge_prog_grpo / edge_ep_grpo). Estimator options go under `algorithm.edge.*` (added with `+`); the
# policy loss `edge_vanilla` (= verl's vanilla, computed by edge_kernels.losses) or `edge_gspo` is optional.
#
# use_fused_kernels -> edge-kernels: EDGE_KERNELS_VERL_FUSED_KERNELS=1 in the workers' environment. On one node
# the workers inherit the launching shell's environment; the runtime_env line below covers multi-node clusters.
# Megatron with tensor parallelism > 1 (vocabulary-parallel head) runs the vocabulary-parallel op (docs/distributed.md).
#
# Dataset: verl's parquet layout (e.g. examples/data_preprocess/gsm8k.py or math_dataset.py), whose reward
# function scores \boxed{} answers.
set -euo pipefail

# the driver's trainer hooks that hand edge_eda/edge_egpo/edge_prog_grpo/edge_ep_grpo the old log-probs and
# entropies verl does not pass to estimators (edge_grpo needs none); importing verl alone installs nothing
export EDGE_KERNELS_VERL_HOOKS=1
export EDGE_KERNELS_VERL_FUSED_KERNELS=1

MODEL=${MODEL:-Qwen/Qwen2.5-Math-1.5B}
TRAIN=${TRAIN:-$HOME/data/math/train.parquet}
VAL=${VAL:-$HOME/data/math/test.parquet}
NGPUS=${NGPUS:-8}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=edge_eda \
    algorithm.norm_adv_by_std_in_grpo=True \
    algorithm.use_kl_in_reward=False \
    +algorithm.edge.eda_clamp=null \
    +algorithm.edge.adv_eps=1e-6 \
    data.train_files="$TRAIN" \
    data.val_files="$VAL" \
    data.train_batch_size=128 \
    data.max_prompt_length=1024 \
    data.max_response_length=3072 \
    data.filter_overlong_prompts=True \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.use_fused_kernels=True \
    actor_rollout_ref.model.fused_kernel_options.impl_backend=triton \
    actor_rollout_ref.actor.strategy=fsdp \
    actor_rollout_ref.actor.policy_loss.loss_mode=edge_vanilla \
    actor_rollout_ref.actor.clip_ratio_low=0.2 \
    actor_rollout_ref.actor.clip_ratio_high=0.28 \
    actor_rollout_ref.actor.loss_agg_mode=token-mean \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
    +ray_kwargs.ray_init.runtime_env.env_vars.EDGE_KERNELS_VERL_FUSED_KERNELS='"1"' \
    trainer.logger='["console"]' \
    trainer.project_name=edge-kernels \
    trainer.experiment_name=edge-eda-qwen2.5-math-1.5b \
    trainer.n_gpus_per_node="$NGPUS" \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    "$@"

# Other estimators (same launch, one key):
#   algorithm.adv_estimator=edge_egpo  +algorithm.edge.egpo_w_min=0.8  +algorithm.edge.correct_threshold=0.5
#   algorithm.adv_estimator=edge_prog_grpo  +algorithm.edge.prog_alpha=0.3
#   algorithm.adv_estimator=edge_ep_grpo    +algorithm.edge.ep_lambda=0.1
# Sequence-level importance sampling:  actor_rollout_ref.actor.policy_loss.loss_mode=edge_gspo
#   actor_rollout_ref.actor.clip_ratio_low=3e-4 actor_rollout_ref.actor.clip_ratio_high=4e-4
#   actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean
# Not available in verl (refused with an error): algorithm.edge.eda_entropy_source=current (verl's policy-loss
# functions receive no entropies), algorithm.edge.prog_baseline=prompt (no prompt log-probs), and the
# entropy-based estimators under algorithm.rollout_correction.bypass_mode=True (no entropies are computed).
