"""The data layer: JSONL records and their validation (`records.records`), videos and their frame
sampling (`records.video`), the mixture and order of records a step sees (`records.mixture`)."""
from records.records import (
                             DataError,
                             Media,
                             Record,
                             count_image_parts,
                             count_parts,
                             iter_jsonl,
                             load_images,
                             load_media,
                             load_records,
                             media_counts,
                             message_text,
                             parse_record,
                             prompt_key,
                             unique_prompts,
                             write_records,
)
from records.video import VideoGeometry, VideoSampling, VideoSource

__all__ = ["DataError", "Media", "Record", "VideoGeometry", "VideoSampling", "VideoSource",
           "count_image_parts", "count_parts", "iter_jsonl", "load_images", "load_media", "load_records", "media_counts", "message_text",
           "parse_record", "prompt_key", "unique_prompts", "write_records"]
