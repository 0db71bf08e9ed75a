"""The merchant-facing order API (SPEC 3). Thin: validate, call a service or selector, render."""

import base64
import uuid
from datetime import UTC
from urllib import parse

from django.core import signing
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.response import Response
from rest_framework.utils.urls import replace_query_param
from rest_framework.views import APIView

from core.exception_handlers import ApiError
from orders import selectors, services
from orders.serializers import (
    OrderCreateSerializer,
    OrderListQuerySerializer,
    OrderSerializer,
    RefundCreateSerializer,
    RefundSerializer,
    TransitionSerializer,
    order_representation,
    refund_representation,
)

ErrorSerializer = inline_serializer(
    "Error",
    fields={
        "error": inline_serializer(
            "ErrorBody",
            fields={
                "code": serializers.CharField(),
                "message": serializers.CharField(),
                "fields": serializers.DictField(help_text="The fields at fault and why; {} when none is."),
            },
        )
    },
)
# Every API operation may answer these: the request's own faults, and 503 while PostgreSQL is
# unreachable (retry with the same Idempotency-Key).
ERRORS = {
    code: OpenApiResponse(ErrorSerializer) for code in (400, 401, 404, 405, 406, 409, 413, 415, 422, 429, 503)
}


def _idempotency_key(request) -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        raise ApiError(400, "idempotency_key_missing", "The Idempotency-Key header is required.")
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise ApiError(
            400, "idempotency_key_invalid", "Idempotency-Key must be 1 to 255 printable ASCII characters."
        )
    return key


def _cursor_signer() -> signing.Signer:
    return signing.Signer(salt="orders.cursor")


class OrderCursorPagination(CursorPagination):
    """DRF's cursor pagination, with cursors signed so only the ones we handed out are read.

    A cursor is base64 of `o=<offset>&r=<reverse>&p=<position>`, and DRF puts the position
    straight into the query's filter: a forged one (`p=garbage`) reached PostgreSQL and was a 500.
    Signing (Django's signing, SECRET_KEY with its fallbacks) refuses every cursor we did not
    write; the position is still parsed as the aware datetime it must be, so a cursor signed
    before a format change cannot reach the filter either.
    """

    ordering = ("-created_at", "-id")
    page_size = 20
    page_size_query_param = "limit"
    max_page_size = 100

    def encode_cursor(self, cursor: Cursor) -> str:
        tokens = {}
        if cursor.offset != 0:
            tokens["o"] = str(cursor.offset)
        if cursor.reverse:
            tokens["r"] = "1"
        if cursor.position is not None:
            tokens["p"] = cursor.position
        querystring = parse.urlencode(tokens, doseq=True)
        encoded = base64.urlsafe_b64encode(querystring.encode("ascii")).decode("ascii")
        return replace_query_param(self.base_url, self.cursor_query_param, _cursor_signer().sign(encoded))

    def decode_cursor(self, request) -> Cursor | None:
        raw = request.query_params.get(self.cursor_query_param)
        if raw is None:
            return None
        try:
            encoded = _cursor_signer().unsign(raw)
            tokens = parse.parse_qs(
                base64.urlsafe_b64decode(encoded.encode("ascii")).decode("ascii"),
                keep_blank_values=True,
                strict_parsing=bool(encoded),
            )
            offset = int(tokens.get("o", ["0"])[0])
            reverse = tokens.get("r", ["0"])[0]
            position = tokens.get("p", [None])[0]
            if not 0 <= offset <= self.offset_cutoff or reverse not in ("0", "1"):
                raise ValueError("offset or direction out of range")
            if position is not None:
                moment = parse_datetime(position)
                if moment is None or moment.tzinfo is None:
                    raise ValueError("position is not an aware datetime")
                moment.astimezone(UTC)  # OverflowError near year 1 or 9999
        except (signing.BadSignature, ValueError, TypeError, OverflowError, UnicodeError) as exc:
            # DRF answers an unreadable cursor with 404; it is a bad filter value (SPEC 3: 400)
            raise ApiError(
                400, "invalid_request", "Invalid cursor.", {"cursor": ["Invalid cursor."]}
            ) from exc
        return Cursor(offset=offset, reverse=reverse == "1", position=position)


IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7E]+$"},
    OpenApiParameter.HEADER,
    required=True,
    description="1 to 255 printable ASCII characters; the same key replays the first answer.",
)


def _created(result: services.CreateResult) -> Response:
    response = Response(result.body, status=result.status)
    if result.replayed:
        response["Idempotent-Replayed"] = "true"
    return response


class OrderListCreateApi(APIView):
    @extend_schema(
        operation_id="orders_create",
        request=OrderCreateSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={201: OrderSerializer, **ERRORS},
        description="Take a payment order (SPEC 3). The same Idempotency-Key with the same body answers"
        " the first 201 again, with the header `Idempotent-Replayed: true`, and makes no second order;"
        " with another body: `idempotency_key_reused` (422); while the first is still in flight:"
        " `idempotency_key_in_use` (409). A `reference` already used with another key:"
        " `duplicate_reference` (409). The order then moves on by itself: poll it, or wait for the"
        " signed callback.",
    )
    def post(self, request):
        key = _idempotency_key(request)
        serializer = OrderCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        result = services.order_create(
            merchant=request.user,
            idempotency_key=key,
            fingerprint=services.request_fingerprint(data),
            reference=data["reference"],
            amount=data["amount"],
            currency=data["currency"],
            description=data.get("description", ""),
            metadata=data.get("metadata"),
            callback_url=data.get("callback_url", ""),
            payment_method=data.get("payment_method"),
            request_id=getattr(request._request, "request_id", ""),
        )
        return _created(result)

    @extend_schema(
        operation_id="orders_list",
        parameters=[OrderListQuerySerializer],
        responses={
            200: inline_serializer(
                "OrderPage",
                fields={
                    "results": OrderSerializer(many=True),
                    "next": serializers.URLField(allow_null=True),
                    "previous": serializers.URLField(allow_null=True),
                },
            ),
            **ERRORS,
        },
    )
    def get(self, request):
        query = OrderListQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        queryset = selectors.order_list(merchant=request.user, filters=query.validated_data)
        paginator = OrderCursorPagination()
        page = paginator.paginate_queryset(queryset, request, view=self)
        return Response(
            {
                "results": OrderSerializer(page, many=True).data,
                "next": paginator.get_next_link(),
                "previous": paginator.get_previous_link(),
            }
        )


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _order_or_404(request, order_id: str):
    order = selectors.order_get(merchant=request.user, order_id=order_id) if _is_uuid(order_id) else None
    if order is None:
        raise ApiError(status.HTTP_404_NOT_FOUND, "not_found", "No such order.")
    return order


def _refund_or_404(request, refund_id: str):
    refund = selectors.refund_get(merchant=request.user, refund_id=refund_id) if _is_uuid(refund_id) else None
    if refund is None:
        raise ApiError(status.HTTP_404_NOT_FOUND, "not_found", "No such refund.")
    return refund


class OrderDetailApi(APIView):
    @extend_schema(operation_id="orders_retrieve", responses={200: OrderSerializer, **ERRORS})
    def get(self, request, order_id: str):
        return Response(order_representation(_order_or_404(request, order_id)))


class OrderEventsApi(APIView):
    @extend_schema(operation_id="orders_events", responses={200: TransitionSerializer(many=True), **ERRORS})
    def get(self, request, order_id: str):
        order = _order_or_404(request, order_id)
        return Response(TransitionSerializer(selectors.order_transitions(order=order), many=True).data)


class OrderRefundsApi(APIView):
    @extend_schema(
        operation_id="orders_refunds_create",
        request=RefundCreateSerializer,
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        responses={201: RefundSerializer, **ERRORS},
        description="Refund a paid order, in full (no amount) or in part (SPEC 10). Errors:"
        " `amount_exceeds_refundable` (400), `order_not_refundable` (409), `not_found` (404).",
    )
    def post(self, request, order_id: str):
        key = _idempotency_key(request)
        if not _is_uuid(order_id):
            raise ApiError(status.HTTP_404_NOT_FOUND, "not_found", "No such order.")
        serializer = RefundCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        order_id = str(uuid.UUID(order_id))
        result = services.refund_create(
            merchant=request.user,
            order_id=order_id,
            idempotency_key=key,
            fingerprint=services.refund_fingerprint(order_id=order_id, data=data),
            amount=data.get("amount"),
            reason=data.get("reason"),
            reference=data.get("reference"),
            metadata=data.get("metadata"),
            request_id=getattr(request._request, "request_id", ""),
        )
        return _created(result)

    @extend_schema(operation_id="orders_refunds_list", responses={200: RefundSerializer(many=True), **ERRORS})
    def get(self, request, order_id: str):
        order = _order_or_404(request, order_id)
        return Response([refund_representation(r) for r in selectors.refunds_of_order(order=order)])


class RefundDetailApi(APIView):
    @extend_schema(operation_id="refunds_retrieve", responses={200: RefundSerializer, **ERRORS})
    def get(self, request, refund_id: str):
        return Response(refund_representation(_refund_or_404(request, refund_id)))


class RefundEventsApi(APIView):
    @extend_schema(operation_id="refunds_events", responses={200: TransitionSerializer(many=True), **ERRORS})
    def get(self, request, refund_id: str):
        refund = _refund_or_404(request, refund_id)
        return Response(TransitionSerializer(selectors.refund_transitions(refund=refund), many=True).data)
