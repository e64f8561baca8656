# Sourced by the device scripts (bench/gpu_ddp.sh, gpu_generate.sh, gpu_generate_ranks.sh, gpu_run_x2.sh),
# from the repository root with .whl/ carried (bench/gpu_prepare.sh): the pinned wheels installed beside the
# image's torch in $SITE, on PYTHONPATH with the checkout; NVLink multicast off (the multi-GPU hosts' rule);
# the image's accelerate kept if the pinned one does not import beside its torch; the GPUs listed.
SITE="$(mktemp -d)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DERMKOHYA_CACHE="$SITE/cache"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import accelerate.commands.launch" 2>/dev/null || rm -rf "$SITE"/accelerate "$SITE"/accelerate-*
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
