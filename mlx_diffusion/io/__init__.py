"""File formats: safetensors and GGUF readers (one tensor at a time, checked against the file), and the model-folder
format that the converter writes and pipelines read (`folder`)."""
