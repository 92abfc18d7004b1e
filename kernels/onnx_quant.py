"""Weight quantization of ONNX graphs with ONNX Runtime's own tools (the formats its kernels run fast)."""

from __future__ import annotations

from pathlib import Path

ONNX_PRESETS = ("fp32", "int8", "q4")


def quantize_onnx(src: Path, dst: Path, preset: str, external_data: bool = False) -> None:
    """fp32 → int8 (dynamic, QInt8 weights, MatMuls with constant weights only) or q4 (MatMulNBits, 4-bit,
    blocks of 32, accuracy_level 4 so the int8 compute kernels are used)."""
    if preset == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=external_data)
    elif preset == "q4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=external_data)
    else:
        raise ValueError(f"unknown ONNX preset {preset!r}; choose one of {', '.join(ONNX_PRESETS)}")
