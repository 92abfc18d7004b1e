"""MedGemma on llama.cpp: which files a model is (model_files), loading them (loader, probe), libmtmd (mtmd, its
only caller), the vision tower on ONNX Runtime (onnx_vision), the engine that prefills and samples (engine), and
images encoded once for many questions (session)."""
