"""The data layer: JSONL records and their validation (`records.records`), the mixture and order of
records a step sees (`records.mixture`)."""
from records.records import (
                             DataError,
                             Record,
                             count_image_parts,
                             iter_jsonl,
                             load_images,
                             load_records,
                             message_text,
                             parse_record,
                             prompt_key,
                             unique_prompts,
                             write_records,
)

__all__ = ["DataError", "Record", "count_image_parts", "iter_jsonl", "load_images", "load_records",
           "message_text", "parse_record", "prompt_key", "unique_prompts", "write_records"]
