"""The embedded demonstrations: the text demo (`text`), the vision-language miniature (`vqa`) and the
LLaVA it assembles from the embedded SmolLM2 (`llava`)."""
