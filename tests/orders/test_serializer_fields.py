"""Request body serializers copy their declared fields cheaply (orders/serializers.py
_field_copy); each instance must still own its fields, as with DRF's deep copy."""

from orders.serializers import OrderCreateSerializer

BODY = {"amount": 100, "currency": "USD", "reference": "r-1", "metadata": {"k": "v"}}


def test_each_instance_owns_its_fields_and_the_declared_ones_stay_unbound():
    first, second = (
        OrderCreateSerializer(data=BODY),
        OrderCreateSerializer(data={**BODY, "metadata": {"k": 1}}),
    )

    assert first.is_valid(), first.errors
    assert not second.is_valid()

    for name, declared in OrderCreateSerializer._declared_fields.items():
        mine, theirs = first.fields[name], second.fields[name]
        assert mine is not theirs and mine is not declared
        assert (mine.parent, theirs.parent, mine.field_name) == (first, second, name)
        assert declared.parent is None and declared.field_name is None
    # the dict's child is copied and bound to the instance's own dict field
    metadata = first.fields["metadata"]
    assert metadata.child is not second.fields["metadata"].child
    assert metadata.child.parent is metadata and metadata.child.root is first
    assert (
        OrderCreateSerializer._declared_fields["metadata"].child.parent
        is (OrderCreateSerializer._declared_fields["metadata"])
    )


def test_errors_still_name_the_field_and_the_key():
    serializer = OrderCreateSerializer(data={**BODY, "metadata": {"k": 1, "ok": "x"}, "amount": "1"})

    assert not serializer.is_valid()
    assert set(serializer.errors) == {"metadata", "amount"}
    assert set(serializer.errors["metadata"]) == {"k"}
