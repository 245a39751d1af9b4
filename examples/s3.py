"""S3 (or MinIO, LocalStack): one JSON object per model.

Credentials, region and endpoint come from the usual AWS environment:
    AWS_ENDPOINT_URL=http://localhost:9000 TOAST_S3_URL=s3://my-bucket/models python examples/s3.py
"""

import asyncio
import os

from pydantic_toast import ExternalBaseModel, ExternalConfigDict, aclose

STORAGE = os.environ.get("TOAST_S3_URL", "s3://my-bucket/models")


class Report(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=STORAGE)

    title: str
    rows: list[dict[str, float]]


async def main() -> None:
    report = Report(title="Q3", rows=[{"revenue": 1.5e6, "cost": 9.1e5}] * 100)
    reference = await report.save_external()
    print("stored as", f"{STORAGE}/Report/{reference['id']}.json")
    loaded = await Report.load_external(reference)
    assert loaded == report
    print("loaded:", loaded.title, "with", len(loaded.rows), "rows")
    await aclose()


if __name__ == "__main__":
    asyncio.run(main())
