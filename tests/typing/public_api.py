"""User code as a type checker sees it: `tests/test_typing.py` runs ``mypy --strict`` here.

``assert_type`` pins what the library's signatures promise (an ``Any`` where a precise type
belongs fails it), and each line whose comment is ``E:`` and a fragment is wrong code that mypy must
refuse with an error containing the fragment. The file is only type-checked, never run.
"""

from typing import Annotated, Any, assert_type

from pydantic import BaseModel

from pydantic_toast import (
    External,
    ExternalBaseModel,
    ExternalConfigDict,
    ExternalField,
    ExternalReference,
    StorageBackend,
    collect_garbage,
    dump,
    dump_json,
    dump_json_sync,
    dump_sync,
    validate,
    validate_sync,
)

STORAGE = "memory://typing"


class User(ExternalBaseModel):
    model_config = ExternalConfigDict(storage=STORAGE)

    name: str


class Line(BaseModel):
    sku: str


class Order(BaseModel):
    user: External[User]
    lines: list[External[Line]]


async def models(user: User, reference: ExternalReference, message: object) -> None:
    assert_type(await user.save_external(), ExternalReference)
    assert_type(await User.load_external(reference), User)
    assert_type(await User.load_external_many([reference], missing_ok=True), list[User | None])
    assert_type(User.load_external_sync(reference), User)
    # delete_external: by reference on the class, the model's own record on an instance
    assert_type(await User.delete_external(reference), bool)
    assert_type(await User.delete_external(reference, missing_ok=False), bool)
    assert_type(await user.delete_external(), bool)
    assert_type(User.delete_external_sync(reference), bool)
    assert_type(user.delete_external_sync(missing_ok=False), bool)
    if User.is_external_reference(message):
        assert_type(message, ExternalReference)
        await User.load_external(message)


async def wrong_models(user: User, reference: ExternalReference) -> None:
    user.delete_external()  # E: [unused-coroutine]
    await user.delete_external_sync()  # E: Incompatible types in "await"
    await User.delete_external(reference, missing_ok="no")  # E: [arg-type]
    await User.delete_external("not a reference")  # E: [arg-type]
    await user.delete_external(reference)  # E: Too many positional arguments
    await User.delete_external()  # E: Missing positional argument
    deleted: str = await User.delete_external(reference)  # E: [assignment]
    print(deleted)
    User.load_external(reference)  # E: [unused-coroutine]


async def dumps(order: Order, backend: StorageBackend) -> None:
    assert_type(await dump(order, storage=STORAGE, exclude_none=True), dict[str, Any])
    assert_type(await dump([Line(sku="a")], as_type=list[External[Line]]), Any)
    assert_type(await dump_json(order, storage=STORAGE, indent=2), str)
    assert_type(dump_sync(order, storage=STORAGE, by_alias=True), dict[str, Any])
    assert_type(dump_json_sync(order, storage=STORAGE), str)
    assert_type(await validate(Order, {}, storage=STORAGE), Order)
    assert_type(validate_sync(Order, "{}", storage=STORAGE, max_depth=4), Order)
    validate_sync(External[Line] | None, None, storage=STORAGE)
    validate_sync(Annotated[Line, ExternalField(threshold=1)], {"sku": "a"}, storage=STORAGE)
    await validate(Annotated[Line, ExternalField(threshold=1)], {"sku": "a"}, storage=STORAGE)
    await collect_garbage(STORAGE, roots_from=backend)
    await collect_garbage(STORAGE, roots_from=[backend, "memory://other"])


async def wrong_dumps(order: Order) -> None:
    await dump(order, storag=STORAGE)  # E: Unexpected keyword argument "storag"
    dump_sync(order, storag=STORAGE)  # E: Unexpected keyword argument "storag"
    dump_json_sync(order, mode="json")  # E: Unexpected keyword argument "mode"
    await dump_json(order, exclude_none="yes")  # E: [arg-type]
    validate_sync(Order, {}, storag=STORAGE)  # E: Unexpected keyword argument "storag"
    await validate(Order, {}, max_depth="deep")  # E: [call-overload]
