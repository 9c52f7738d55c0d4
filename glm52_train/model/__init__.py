"""The GLM-5.2 model on Megatron-Core: config conversion, specs, DSA attention, build."""
