/*
 * phiaudit.receiver._native: the compiled extractor for audit spans.
 *
 * OTLP ExportTraceServiceRequest bytes -> the audit_events rows of its *eligible* audit spans,
 * as Arrow buffers (one set per column, no Python object per row), encrypted and leaf-hashed
 * exactly as the Python path (_extract.Extractor + storage.RecordEncoder) would store them.
 *
 * The Python path is the reference. A span is eligible only when every input it reads is
 * mapped here exactly as the Python code maps it; any other span (non-audit spans, spans with
 * phi.access events, database spans, unusual value types, duplicate keys or singular fields,
 * absurd times, values the Python code normalises) is left to the Python path, which the
 * caller runs on the same request with the eligible spans skipped (their ordinals are
 * returned). tests/receiver/test_native.py checks that both paths give the same rows.
 *
 * The input is untrusted: every read is bounds-checked, every length is checked against the
 * end of its enclosing message, and nesting is bounded by the schema (no recursion in the
 * walk). Called with `validate`, extract first gives the protobuf runtime's verdict on the
 * bytes (validate(): the same requests accepted and refused as upb, without building them;
 * bounded recursion there) and returns False for a request protobuf would refuse: the service
 * then parses a request with protobuf only when spans are left to the Python path. On
 * anything the walk does not understand it returns None and the caller uses the Python path
 * (and protobuf) for the request.
 *
 * Crypto (OpenSSL libcrypto): AES-256-GCM with a fresh random 96-bit nonce per field
 * (RAND_bytes), AAD "phiaudit:v1|<column>|<event id>", layout 01 || key id (4, BE) ||
 * event id (16) || nonce (12) || ciphertext || tag (16); blind indexes are the first 16 bytes
 * of HMAC-SHA256(index key, "<domain>|<value>") in hex; the leaf is SHA-256 of the canonical
 * row (storage/_chain.py). Key material lives only in this call's memory and is wiped.
 */
#define PY_SSIZE_T_CLEAN
/* SHA-256 through libcrypto's SHA256_* functions, which OpenSSL 3 marks deprecated in favour of
 * EVP: for the short messages here (an event id, a row, a blind index: 2-5 a span) EVP's
 * provider dispatch, and above all EVP_MD_CTX_copy_ex (a context allocated and freed, and a
 * reference count shared by every thread bumped, per HMAC), cost more than the digest itself.
 * The same assembly does the hashing either way. */
#define OPENSSL_API_COMPAT 0x10101000L
#include <Python.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------------------- */
/* growable buffers                                                                      */

typedef struct {
    char *p;
    size_t len, cap;
} gbuf;

/* the slow path of gb_reserve, out of line: the check below is inlined at every call (as a
   call of its own it was ~4% of the extractor's time) */
static __attribute__((noinline)) int gb_grow(gbuf *b, size_t extra) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) {
        if (cap > ((size_t)1 << 40)) return -1;
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int gb_reserve(gbuf *b, size_t extra) {
    return b->len + extra <= b->cap ? 0 : gb_grow(b, extra);
}

static inline int gb_put(gbuf *b, const void *d, size_t n) {
    if (gb_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->len, d, n);
    b->len += n;
    return 0;
}

static int gb_putc(gbuf *b, char c) { return gb_put(b, &c, 1); }

static void gb_free(gbuf *b, int wipe) {
    if (b->p && wipe) OPENSSL_cleanse(b->p, b->cap);
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* decimal text of v into buf (at least 21 bytes); returns its length */
static size_t fmt_u(char *buf, unsigned long long v) {
    char t[24];
    size_t n = 0;
    do {
        t[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++) buf[i] = t[n - 1 - i];
    return n;
}

static size_t fmt_i(char *buf, long long v) {
    if (v < 0) {
        buf[0] = '-';
        return 1 + fmt_u(buf + 1, (unsigned long long)(-(v + 1)) + 1);
    }
    return fmt_u(buf, (unsigned long long)v);
}

/* ------------------------------------------------------------------------------------- */
/* protobuf wire format                                                                  */

typedef struct {
    const uint8_t *p;
    size_t n;
} str_t;

typedef struct {
    const uint8_t *p, *end;
} rd_t;

typedef struct {
    uint32_t field, wt;
    uint64_t v;     /* varint / fixed value */
    str_t s;        /* length-delimited payload */
} fld_t;

/* 1: a field was read; 0: end of message; -1: malformed */
static int next_field(rd_t *r, fld_t *f) {
    if (r->p >= r->end) return 0;
    uint64_t key = 0;
    int shift = 0;
    for (;;) {
        if (r->p >= r->end || shift > 63) return -1;
        uint8_t c = *r->p++;
        key |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) break;
        shift += 7;
    }
    f->field = (uint32_t)(key >> 3);
    f->wt = (uint32_t)(key & 7);
    if (f->field == 0 || (key >> 3) > 0x1fffffff) return -1;
    switch (f->wt) {
    case 0: {
        uint64_t v = 0;
        shift = 0;
        for (;;) {
            if (r->p >= r->end || shift > 63) return -1;
            uint8_t c = *r->p++;
            v |= (uint64_t)(c & 0x7f) << shift;
            if (!(c & 0x80)) break;
            shift += 7;
        }
        f->v = v;
        return 1;
    }
    case 1:
        if ((size_t)(r->end - r->p) < 8) return -1;
        memcpy(&f->v, r->p, 8); /* little-endian hosts only (checked at import) */
        r->p += 8;
        return 1;
    case 5: {
        uint32_t v;
        if ((size_t)(r->end - r->p) < 4) return -1;
        memcpy(&v, r->p, 4);
        f->v = v;
        r->p += 4;
        return 1;
    }
    case 2: {
        uint64_t n = 0;
        shift = 0;
        for (;;) {
            if (r->p >= r->end || shift > 63) return -1;
            uint8_t c = *r->p++;
            n |= (uint64_t)(c & 0x7f) << shift;
            if (!(c & 0x80)) break;
            shift += 7;
        }
        if (n > (uint64_t)(r->end - r->p)) return -1;
        f->s.p = r->p;
        f->s.n = (size_t)n;
        f->v = n; /* every field read sets v: callers test the wire type first */
        r->p += n;
        return 1;
    }
    default:
        return -1; /* groups: not used by OTLP */
    }
}

/* ------------------------------------------------------------------------------------- */
/* validation: exactly the requests the protobuf runtime accepts                          */
/*
 * The service answers INVALID_ARGUMENT to a request Python's protobuf (upb) refuses to
 * parse, and used to parse every request with it for that alone (~1.5-2.5 us a span, with
 * the GIL held). validate() gives the same verdict without building the message: it walks
 * the wire format with the schema of ExportTraceServiceRequest (every message reachable from
 * it, TRACE_SCHEMA below; phiaudit.receiver._fast compares it with the installed descriptors
 * and turns the compiled validation off on any difference). upb's rules, each checked
 * against it (tests/receiver/test_validate.py compares the verdicts on mutated requests):
 *
 * - a tag is a varint of at most 5 bytes (an over-long encoding of a small tag included)
 *   and at most 2^32 - 1; field number 0 is refused, except inside a group (below);
 * - a varint value is at most 10 bytes; the 10th byte's high bits are ignored;
 * - a length is a varint of at most 5 bytes, and must not pass the end of the enclosing
 *   message (nor 2^31 - 1: no input here is that long, see validate());
 * - fixed64 / fixed32 need 8 / 4 bytes; wire types 6 and 7 are refused;
 * - a known field with another wire type than its own is an unknown field (not refused);
 *   unknown fields are skipped, their length-delimited contents never looked into;
 * - a group (wire type 3) in an unknown field (or a known one sent as a group) is skipped up
 *   to the end-group tag of the same field number (the same tag value: an over-long
 *   encoding of it is accepted); inside a group any field number, 0 included, is skipped;
 *   an end-group (wire type 4) that closes no open group, or another field's, is refused,
 *   as is a group still open at the end of its message;
 * - proto3 `string` fields must be valid UTF-8 (no over-long forms, surrogates or code points
 *   past U+10FFFF; NUL is valid); `bytes` fields and unknown fields are not checked;
 * - depth: the request is level 0, each message field and each group one level deeper;
 *   level 100 is accepted, 101 refused (an empty message counts too).
 * Enum values, int32 truncation, duplicate singular fields and oneof members: no effect on the
 * verdict. Recursion is bounded by the depth limit (at most 101 frames).
 */

#define PB_MAX_DEPTH 100 /* upb's default: Python's protobuf without SetAllowOversizeProtos */

enum { V_UNKNOWN = 0, V_VARINT, V_FIXED64, V_FIXED32, V_STRING, V_BYTES, V_MESSAGE };
static const char *V_KIND_NAMES[] = {"", "varint", "fixed64", "fixed32", "string", "bytes",
                                     "message"};
static const uint8_t V_WIRE[] = {8, 0, 1, 5, 2, 2, 2}; /* 8: matches no wire type */

enum { M_REQUEST, M_RESOURCE_SPANS, M_RESOURCE, M_KEY_VALUE, M_ANY_VALUE, M_ARRAY_VALUE,
       M_KEY_VALUE_LIST, M_ENTITY_REF, M_SCOPE_SPANS, M_SCOPE, M_SPAN, M_EVENT, M_LINK,
       M_STATUS, NMSGS };

typedef struct {
    uint8_t number, kind, msg; /* msg: for V_MESSAGE */
} vfield_t;

#define V_FIELDS 24 /* fields of a message at most, plus the {0} that ends the list */
typedef struct {
    const char *name;
    vfield_t fields[V_FIELDS]; /* up to the first {0} */
} vmsg_t;

#define MSG(n, m) {n, V_MESSAGE, m}
static const vmsg_t TRACE_SCHEMA[NMSGS] = {
    [M_REQUEST] = {"opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest",
                   {MSG(1, M_RESOURCE_SPANS)}},
    [M_RESOURCE_SPANS] = {"opentelemetry.proto.trace.v1.ResourceSpans",
                          {MSG(1, M_RESOURCE), MSG(2, M_SCOPE_SPANS), {3, V_STRING, 0}}},
    [M_RESOURCE] = {"opentelemetry.proto.resource.v1.Resource",
                    {MSG(1, M_KEY_VALUE), {2, V_VARINT, 0}, MSG(3, M_ENTITY_REF)}},
    [M_KEY_VALUE] = {"opentelemetry.proto.common.v1.KeyValue",
                     {{1, V_STRING, 0}, MSG(2, M_ANY_VALUE), {3, V_VARINT, 0}}},
    [M_ANY_VALUE] = {"opentelemetry.proto.common.v1.AnyValue",
                     {{1, V_STRING, 0}, {2, V_VARINT, 0}, {3, V_VARINT, 0}, {4, V_FIXED64, 0},
                      MSG(5, M_ARRAY_VALUE), MSG(6, M_KEY_VALUE_LIST), {7, V_BYTES, 0},
                      {8, V_VARINT, 0}}},
    [M_ARRAY_VALUE] = {"opentelemetry.proto.common.v1.ArrayValue", {MSG(1, M_ANY_VALUE)}},
    [M_KEY_VALUE_LIST] = {"opentelemetry.proto.common.v1.KeyValueList",
                          {MSG(1, M_KEY_VALUE)}},
    [M_ENTITY_REF] = {"opentelemetry.proto.common.v1.EntityRef",
                      {{1, V_STRING, 0}, {2, V_STRING, 0}, {3, V_STRING, 0},
                       {4, V_STRING, 0}}},
    [M_SCOPE_SPANS] = {"opentelemetry.proto.trace.v1.ScopeSpans",
                       {MSG(1, M_SCOPE), MSG(2, M_SPAN), {3, V_STRING, 0}}},
    [M_SCOPE] = {"opentelemetry.proto.common.v1.InstrumentationScope",
                 {{1, V_STRING, 0}, {2, V_STRING, 0}, MSG(3, M_KEY_VALUE), {4, V_VARINT, 0}}},
    [M_SPAN] = {"opentelemetry.proto.trace.v1.Span",
                {{1, V_BYTES, 0}, {2, V_BYTES, 0}, {3, V_STRING, 0}, {4, V_BYTES, 0},
                 {5, V_STRING, 0}, {6, V_VARINT, 0}, {7, V_FIXED64, 0}, {8, V_FIXED64, 0},
                 MSG(9, M_KEY_VALUE), {10, V_VARINT, 0}, MSG(11, M_EVENT), {12, V_VARINT, 0},
                 MSG(13, M_LINK), {14, V_VARINT, 0}, MSG(15, M_STATUS), {16, V_FIXED32, 0}}},
    [M_EVENT] = {"opentelemetry.proto.trace.v1.Span.Event",
                 {{1, V_FIXED64, 0}, {2, V_STRING, 0}, MSG(3, M_KEY_VALUE), {4, V_VARINT, 0}}},
    [M_LINK] = {"opentelemetry.proto.trace.v1.Span.Link",
                {{1, V_BYTES, 0}, {2, V_BYTES, 0}, {3, V_STRING, 0}, MSG(4, M_KEY_VALUE),
                 {5, V_VARINT, 0}, {6, V_FIXED32, 0}}},
    [M_STATUS] = {"opentelemetry.proto.trace.v1.Status", {{2, V_STRING, 0}, {3, V_VARINT, 0}}},
};
#undef MSG

/* by message and tag value (field number << 3 | wire type), for tags below 256: the kind
   of a known field sent with its own wire type, else V_UNKNOWN; and the submessage type */
#define V_TAGS 256
static uint8_t V_KIND[NMSGS][V_TAGS], V_SUB[NMSGS][V_TAGS]; /* filled at import */

static int v_init(void) {
    for (int m = 0; m < NMSGS; m++)
        for (const vfield_t *f = TRACE_SCHEMA[m].fields; f->number; f++) {
            if (f - TRACE_SCHEMA[m].fields >= V_FIELDS - 1) return -1; /* no {0} at the end */
            unsigned t = (unsigned)f->number << 3 | V_WIRE[f->kind];
            if (t >= V_TAGS) return -1; /* a field number past 31: widen the tables */
            V_KIND[m][t] = f->kind;
            V_SUB[m][t] = f->msg;
        }
    return 0;
}

/* a varint of at most `max` bytes (upb: 10 for a value, 5 for a tag or a length) */
static int v_varint(const uint8_t **pp, const uint8_t *end, int max, uint64_t *out) {
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < max; i++) {
        if (p >= end) return 0;
        uint8_t c = *p++;
        v |= (uint64_t)(c & 0x7f) << (7 * i); /* i <= 9: bits past 64 are dropped, as upb */
        if (!(c & 0x80)) {
            *pp = p;
            *out = v;
            return 1;
        }
    }
    return 0;
}

static inline int v_tag(const uint8_t **pp, const uint8_t *end, uint32_t *tag) {
    uint64_t t;
    if (*pp < end && **pp < 0x80) { /* one byte: the common case */
        *tag = *(*pp)++;
        return 1;
    }
    if (!v_varint(pp, end, 5, &t) || t > UINT32_MAX) return 0;
    *tag = (uint32_t)t;
    return 1;
}

/* the payload length of a length-delimited field: at most 5 bytes, within the message */
static inline int v_len(const uint8_t **pp, const uint8_t *end, size_t *n) {
    uint64_t v;
    if (*pp < end && **pp < 0x80) {
        v = *(*pp)++;
    } else if (!v_varint(pp, end, 5, &v)) {
        return 0;
    }
    if (v > (uint64_t)(end - *pp)) return 0;
    *n = (size_t)v;
    return 1;
}

/* strict UTF-8 (Unicode 3.9, table 3-7): what upb and Python's decoder accept */
static int v_utf8_slow(const uint8_t *p, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) { /* ASCII, 8 bytes at a time */
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint8_t lo = 0x80, hi = 0xbf; /* the range of the second byte */
        if (c >= 0xc2 && c <= 0xdf) need = 1;
        else if (c == 0xe0) { need = 2; lo = 0xa0; }
        else if (c == 0xed) { need = 2; hi = 0x9f; }
        else if (c >= 0xe1 && c <= 0xef) need = 2;
        else if (c == 0xf0) { need = 3; lo = 0x90; }
        else if (c == 0xf4) { need = 3; hi = 0x8f; }
        else if (c >= 0xf1 && c <= 0xf3) need = 3;
        else return 0;
        if (n - i - 1 < need || p[i + 1] < lo || p[i + 1] > hi) return 0;
        for (size_t k = 2; k <= need; k++)
            if ((p[i + k] & 0xc0) != 0x80) return 0;
        i += need + 1;
    }
    return 1;
}

static inline int v_utf8(const uint8_t *p, size_t n) {
    uint64_t acc = 0; /* all ASCII (the common case): one pass, no branch per byte */
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        acc |= w;
    }
    for (; i < n; i++) acc |= p[i];
    return (acc & 0x8080808080808080ULL) ? v_utf8_slow(p, n) : 1;
}

static int v_skip(const uint8_t **pp, const uint8_t *end, uint32_t tag, int depth);

/* the rest of a group opened by field `number` at level `depth`, through its end tag */
static int v_group(const uint8_t **pp, const uint8_t *end, uint32_t number, int depth) {
    if (depth > PB_MAX_DEPTH) return 0;
    const uint8_t *p = *pp;
    uint32_t end_tag = number << 3 | 4, tag;
    for (;;) {
        if (p >= end || !v_tag(&p, end, &tag)) return 0; /* unterminated */
        if (tag == end_tag) break;
        if (!v_skip(&p, end, tag, depth)) return 0;
    }
    *pp = p;
    return 1;
}

/* an unknown field's value */
static int v_skip(const uint8_t **pp, const uint8_t *end, uint32_t tag, int depth) {
    uint64_t v;
    size_t n;
    switch (tag & 7) {
    case 0: return v_varint(pp, end, 10, &v);
    case 1: n = 8; break;
    case 5: n = 4; break;
    case 2:
        if (!v_len(pp, end, &n)) return 0;
        break;
    case 3: return v_group(pp, end, tag >> 3, depth + 1);
    default: return 0; /* 4: an end-group that closes no open group; 6, 7: none such */
    }
    if ((size_t)(end - *pp) < n) return 0;
    *pp += n;
    return 1;
}

/* one message of type m at level depth; counts the spans */
static int v_message(const uint8_t *p, const uint8_t *end, int m, int depth, size_t *spans) {
    while (p < end) {
        uint32_t tag, number;
        if (!v_tag(&p, end, &tag)) return 0;
        number = tag >> 3;
        if (number == 0) return 0;
        int kind = tag < V_TAGS ? V_KIND[m][tag] : V_UNKNOWN;
        if (kind == V_UNKNOWN) { /* unknown, or a known field with another wire type */
            if (!v_skip(&p, end, tag, depth)) return 0;
            continue;
        }
        uint64_t v;
        size_t n;
        switch (kind) {
        case V_VARINT:
            if (!v_varint(&p, end, 10, &v)) return 0;
            break;
        case V_FIXED64:
        case V_FIXED32:
            n = kind == V_FIXED64 ? 8 : 4;
            if ((size_t)(end - p) < n) return 0;
            p += n;
            break;
        default: /* string, bytes, message */
            if (!v_len(&p, end, &n)) return 0;
            if (kind == V_STRING && !v_utf8(p, n)) return 0;
            if (kind == V_MESSAGE) {
                int sub = V_SUB[m][tag];
                if (depth + 1 > PB_MAX_DEPTH) return 0;
                if (sub == M_SPAN) (*spans)++;
                if (!v_message(p, p + n, sub, depth + 1, spans)) return 0;
            }
            p += n;
            break;
        }
    }
    return 1;
}

/* 1: upb accepts the request (and *spans is its number of spans); 0: upb refuses it;
   -1: not decided here (2 GiB or more: upb's size arithmetic is 32-bit; ask it) */
static int validate(str_t req, size_t *spans) {
    *spans = 0;
    if (req.n >= (size_t)INT32_MAX) return -1;
    if (req.n == 0) return 1;
    return v_message(req.p, req.p + req.n, M_REQUEST, 0, spans);
}

/* ------------------------------------------------------------------------------------- */
/* attributes                                                                            */

enum { K_NONE = 0, K_STR = 1, K_BOOL = 2, K_INT = 3, K_DOUBLE = 4, K_ARRAY = 5, K_KVLIST = 6,
       K_BYTES = 7 };

typedef struct {
    str_t key;
    int kind;
    int bad;       /* a duplicate singular field or an unexpected wire type */
    str_t s;       /* string value, or the ArrayValue bytes */
    int b;
    int64_t i;
} attr_t;

/* AnyValue -> kind and value; bad on anything unusual (then the span is not eligible) */
static int parse_any(str_t m, attr_t *a) {
    rd_t r = {m.p, m.p + m.n};
    fld_t f;
    int rc, seen = 0;
    a->kind = K_NONE;
    while ((rc = next_field(&r, &f)) == 1) {
        if (f.field >= 1 && f.field <= 7) {
            if (seen++) a->bad = 1; /* two members of the oneof: the last wins there */
            int want = (f.field == 1 || f.field == 5 || f.field == 6 || f.field == 7) ? 2
                       : (f.field == 4 ? 1 : 0);
            if ((int)f.wt != want) { a->bad = 1; continue; }
            a->kind = (int)f.field;
            if (f.field == 1 || f.field == 5) a->s = f.s;
            else if (f.field == 2) a->b = f.v != 0;
            else if (f.field == 3) a->i = (int64_t)f.v;
        }
    }
    return rc; /* 0 or -1 */
}

static int parse_kv(str_t m, attr_t *a) {
    rd_t r = {m.p, m.p + m.n};
    fld_t f;
    int rc, seen_key = 0, seen_val = 0;
    memset(a, 0, sizeof(*a));
    a->key.p = (const uint8_t *)""; /* a KeyValue without a key: never a NULL for memcmp */
    while ((rc = next_field(&r, &f)) == 1) {
        if (f.field == 1) {
            if (f.wt != 2 || seen_key++) a->bad = 1;
            else a->key = f.s;
        } else if (f.field == 2) {
            if (f.wt != 2 || seen_val++) { a->bad = 1; continue; }
            if (parse_any(f.s, a) < 0) return -1;
        }
    }
    return rc;
}

/* an ArrayValue whose every value is a plain string; -1 malformed, 0 no, 1 yes */
static int array_of_strings(str_t arr, size_t *count) {
    rd_t r = {arr.p, arr.p + arr.n};
    fld_t f;
    int rc;
    *count = 0;
    int ok = 1;
    while ((rc = next_field(&r, &f)) == 1) {
        if (f.field != 1) continue;
        if (f.wt != 2) { ok = 0; continue; }
        attr_t v;
        memset(&v, 0, sizeof(v));
        if (parse_any(f.s, &v) < 0) return -1;
        if (v.bad || v.kind != K_STR) ok = 0;
        (*count)++;
    }
    return rc < 0 ? -1 : ok;
}

typedef struct {
    attr_t *a;
    size_t n, cap;
} attrs_t;

static int attrs_push(attrs_t *as, const attr_t *a) {
    if (as->n == as->cap) {
        size_t cap = as->cap ? as->cap * 2 : 32;
        attr_t *p = realloc(as->a, cap * sizeof(attr_t));
        if (!p) return -1;
        as->a = p;
        as->cap = cap;
    }
    as->a[as->n++] = *a;
    return 0;
}

static int str_eq(str_t s, const char *lit) {
    size_t n = strlen(lit);
    return s.n == n && memcmp(s.p, lit, n) == 0;
}

static const char HEX[] = "0123456789abcdef";

/* lower-case hex of n bytes into out (2n chars) */
static void hex_into(char *out, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = HEX[p[i] >> 4];
        out[2 * i + 1] = HEX[p[i] & 15];
    }
}

/* ------------------------------------------------------------------------------------- */
/* the mapping (receiver/_extract.py, Extractor._emit)                                    */

static const char *MAPPED[] = {
    "phi.audit.event", "phi.audit.outcome", "phi.audit.action", "phi.record.count",
    "user.roles", "enduser.role", "http.response.status_code", "http.status_code",
    "enduser.id", "user.id", "phi.actor.type", "client.address", "net.peer.ip",
    "http.client_ip", "user_agent.original", "http.user_agent", "http.request.method",
    "http.method", "http.route", "phi.resource.type", "phi.resource.id", "phi.query",
    "phi.purpose", "phi.disclosure.recipient", "phi.device.id", "phi.patient.id", NULL};

static const char *ACTIONS[] = {"read", "search", "create", "update", "delete", "disclose",
                                "export", "print", "login", "logout", "break_glass", "", NULL};
static const char *SUCCESS[] = {"success", "ok", "succeeded", "allowed", "true", NULL};
static const char *FAILURE[] = {"failure", "fail", "failed", "error", "denied", "false", NULL};

enum { S_PHI_AUDIT_EVENT, S_PHI_AUDIT_OUTCOME, S_PHI_AUDIT_ACTION, S_PHI_RECORD_COUNT, S_USER_ROLES, S_ENDUSER_ROLE, S_HTTP_RESPONSE_STATUS_CODE, S_HTTP_STATUS_CODE, S_ENDUSER_ID, S_USER_ID, S_PHI_ACTOR_TYPE, S_CLIENT_ADDRESS, S_NET_PEER_IP, S_HTTP_CLIENT_IP, S_USER_AGENT_ORIGINAL, S_HTTP_USER_AGENT, S_HTTP_REQUEST_METHOD, S_HTTP_METHOD, S_HTTP_ROUTE, S_PHI_RESOURCE_TYPE, S_PHI_RESOURCE_ID, S_PHI_QUERY, S_PHI_PURPOSE, S_PHI_DISCLOSURE_RECIPIENT, S_PHI_DEVICE_ID, S_PHI_PATIENT_ID, NMAPPED };
static size_t MAPPED_LEN[NMAPPED];

/* the index of a key in MAPPED, or -1 */
static int slot_of(str_t k) {
    for (int i = 0; i < NMAPPED; i++)
        if (k.n == MAPPED_LEN[i] && memcmp(k.p, MAPPED[i], k.n) == 0) return i;
    return -1;
}

static int in_list(str_t s, const char **list) {
    for (int i = 0; list[i]; i++)
        if (str_eq(s, list[i])) return 1;
    return 0;
}

/* ASCII-lowered copy into buf (cap 16); 0 when not ASCII or too long */
static int lower_ascii(str_t s, char *buf, size_t cap, str_t *out) {
    if (s.n >= cap) return 0;
    for (size_t i = 0; i < s.n; i++) {
        uint8_t c = s.p[i];
        if (c >= 0x80) return 0;
        buf[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
    }
    out->p = (const uint8_t *)buf;
    out->n = s.n;
    return 1;
}

/* text of a str / bool / int value (Python's _s); tmp holds a formatted int */
typedef struct {
    char b[24];
} numbuf;

static str_t text_of(const attr_t *a, numbuf *tmp) {
    str_t t = {(const uint8_t *)"", 0};
    if (!a) return t;
    switch (a->kind) {
    case K_STR: return a->s;
    case K_BOOL:
        t.p = (const uint8_t *)(a->b ? "true" : "false");
        t.n = a->b ? 4 : 5;
        return t;
    case K_INT:
        t.n = fmt_i(tmp->b, (long long)a->i);
        t.p = (const uint8_t *)tmp->b;
        return t;
    default: return t;
    }
}

static int truthy(const attr_t *a) {
    if (!a) return 0;
    switch (a->kind) {
    case K_STR: return a->s.n > 0;
    case K_BOOL: return a->b;
    case K_INT: return a->i != 0;
    default: return 0;
    }
}

/* _s(a if a is not None else (b or c or "")) */
static str_t first_of(const attr_t *a, const attr_t *b, const attr_t *c, numbuf *tmp) {
    if (a) return text_of(a, tmp);
    if (truthy(b)) return text_of(b, tmp);
    if (truthy(c)) return text_of(c, tmp);
    str_t e = {(const uint8_t *)"", 0};
    return e;
}

/* ------------------------------------------------------------------------------------- */
/* output columns (Arrow layouts)                                                        */

enum { C_EVENT_ID, C_EVENT_TIME, C_RECEIVED_TIME, C_TIME_SOURCE, C_SOURCE, C_ACTION, C_OUTCOME,
       C_OUTCOME_REASON, C_ACTOR_ID, C_ACTOR_TYPE, C_ACTOR_ROLES, C_SERVICE_NAME, C_HOST_NAME,
       C_RESOURCE_TYPE, C_RESOURCE_ID, C_RESOURCE_BIDX, C_PATIENT_ID, C_PATIENT_BIDX,
       C_RECORD_COUNT, C_QUERY, C_PURPOSE, C_RECIPIENT, C_CLIENT_ADDRESS, C_CLIENT_BIDX,
       C_USER_AGENT, C_DEVICE_ID, C_HTTP_METHOD, C_HTTP_ROUTE, C_HTTP_STATUS, C_TRACE_ID,
       C_SPAN_ID, C_SENDER, C_EXTRA, C_KEY_ID, C_WRITER_ID, C_SEQ, C_PREV_HASH, C_HASH, NCOLS };

static const char *COLUMN_NAMES[NCOLS] = {
    "event_id", "event_time", "received_time", "time_source", "source", "action", "outcome",
    "outcome_reason", "actor_id", "actor_type", "actor_roles", "service_name", "host_name",
    "resource_type", "resource_id", "resource_bidx", "patient_id", "patient_bidx",
    "record_count", "query", "purpose", "recipient", "client_address", "client_bidx",
    "user_agent", "device_id", "http_method", "http_route", "http_status", "trace_id",
    "span_id", "sender", "extra", "key_id", "writer_id", "seq", "prev_hash", "hash"};

/* layout of each column: b=binary (int32 offsets + data), f16/f32 fixed binary,
   i64/u64/u32/u16 fixed-width numbers, l=list of binary */
static const char *COLUMN_LAYOUTS[NCOLS] = {
    "f16", "i64", "i64", "b", "b", "b", "b", "b", "b", "b", "l", "b", "b", "b", "b", "b", "b",
    "b", "u64", "b", "b", "b", "b", "b", "b", "b", "b", "b", "u16", "b", "b", "b", "b", "u32",
    "b", "u64", "f32", "f32"};

typedef struct {
    gbuf data, offs, child_offs;
} col_t;

typedef struct {
    col_t c[NCOLS];
    gbuf canon;   /* one row's canonical encoding */
    gbuf plain;   /* scratch */
    gbuf extra;   /* the JSON of extra */
    EVP_CIPHER_CTX *aes;
    SHA256_CTX hin, hout; /* HMAC's keyed inner and outer states: copied per blind index */
    size_t max_rows;    /* 0: no limit; past it the request is left to Python (-3) */
    EVP_CIPHER *gcm;
    uint8_t key_hdr[4];
    uint8_t nonces[12 * 256]; /* drawn from the OS generator 256 at a time */
    size_t nonce_at;
    const char *sender;
    size_t sender_n;
    int64_t now_us;
    size_t rows;
} out_t;

static int put_off(gbuf *offs, size_t v) {
    if (v > 0x7fffffff) return -1;
    int32_t o = (int32_t)v;
    return gb_put(offs, &o, 4);
}

static int col_bin(out_t *o, int c, const void *p, size_t n) {
    if (gb_put(&o->c[c].data, p, n)) return -1;
    return put_off(&o->c[c].offs, o->c[c].data.len);
}

static int col_num(out_t *o, int c, const void *p, size_t n) { return gb_put(&o->c[c].data, p, n); }

/* canonical encoding: netstrings (storage/_chain.py) */
static int canon_ns(out_t *o, const void *p, size_t n) {
    char num[24];
    size_t k = fmt_u(num, n);
    num[k++] = ':';
    if (gb_reserve(&o->canon, k + n)) return -1;
    memcpy(o->canon.p + o->canon.len, num, k);
    if (n) memcpy(o->canon.p + o->canon.len + k, p, n);
    o->canon.len += k + n;
    return 0;
}

static int canon_u(out_t *o, unsigned long long v) {
    char num[24];
    return canon_ns(o, num, fmt_u(num, v));
}

static int canon_i(out_t *o, long long v) {
    char num[24];
    return canon_ns(o, num, fmt_i(num, v));
}

/* a string column, in the row and in its canonical encoding */
static int put_str(out_t *o, int c, const void *p, size_t n) {
    if (col_bin(o, c, p, n)) return -1;
    return canon_ns(o, p, n);
}

/* SHA-256 of p[0..n) into out: the extractor's, the linker's and the fold's one digest */
static int sha256(const void *p, size_t n, uint8_t out[32]) {
    SHA256_CTX c;
    if (SHA256_Init(&c) != 1 || SHA256_Update(&c, p, n) != 1 || SHA256_Final(out, &c) != 1)
        return -1;
    return 0;
}

/* HMAC-SHA256 from the keyed inner/outer states */
static int hmac(out_t *o, const char *domain, const uint8_t *v, size_t n, uint8_t mac[32]) {
    uint8_t inner[32];
    SHA256_CTX c = o->hin;
    int ok = SHA256_Update(&c, domain, strlen(domain)) == 1 && SHA256_Update(&c, "|", 1) == 1 &&
             SHA256_Update(&c, v, n) == 1 && SHA256_Final(inner, &c) == 1;
    c = o->hout;
    ok = ok && SHA256_Update(&c, inner, 32) == 1 && SHA256_Final(mac, &c) == 1;
    OPENSSL_cleanse(&c, sizeof(c));
    return ok ? 0 : -1;
}

static int put_bidx(out_t *o, int c, const char *domain, str_t v) {
    if (v.n == 0) return put_str(o, c, "", 0);
    uint8_t mac[32];
    char hex[32];
    if (hmac(o, domain, v.p, v.n, mac)) return -1;
    hex_into(hex, mac, 16);
    return put_str(o, c, hex, 32);
}

static int put_enc(out_t *o, int c, const char *column, const uint8_t eid[16], const uint8_t *v,
                   size_t n) {
    if (n == 0) return put_str(o, c, "", 0);
    if (n > 0x7fffff00) return -1;
    uint8_t nonce[12];
    int len = 0;
    if (o->nonce_at == 0 || o->nonce_at >= sizeof(o->nonces)) {
        if (RAND_bytes(o->nonces, (int)sizeof(o->nonces)) != 1) return -1;
        o->nonce_at = 0;
    }
    memcpy(nonce, o->nonces + o->nonce_at, 12);
    o->nonce_at += 12;
    gbuf *b = &o->plain;
    b->len = 0;
    if (gb_reserve(b, 1 + 4 + 16 + 12 + n + 16)) return -1;
    uint8_t *p = (uint8_t *)b->p;
    p[0] = 1;
    memcpy(p + 1, o->key_hdr, 4);
    memcpy(p + 5, eid, 16);
    memcpy(p + 21, nonce, 12);
    if (EVP_EncryptInit_ex(o->aes, NULL, NULL, NULL, nonce) != 1) return -1;
    /* the AAD "phiaudit:v1|<column>|<event id>" in one update */
    static const char prefix[] = "phiaudit:v1|";
    uint8_t aad[64];
    size_t cn = strlen(column), an = sizeof(prefix) - 1;
    if (an + cn + 1 + 16 > sizeof(aad)) return -1;
    memcpy(aad, prefix, an);
    memcpy(aad + an, column, cn);
    aad[an + cn] = '|';
    memcpy(aad + an + cn + 1, eid, 16);
    if (EVP_EncryptUpdate(o->aes, NULL, &len, aad, (int)(an + cn + 17)) != 1) return -1;
    if (EVP_EncryptUpdate(o->aes, p + 33, &len, v, (int)n) != 1) return -1;
    size_t total = 33 + (size_t)len;
    if (EVP_EncryptFinal_ex(o->aes, p + total, &len) != 1) return -1;
    total += (size_t)len;
    if (EVP_CIPHER_CTX_ctrl(o->aes, EVP_CTRL_GCM_GET_TAG, 16, p + total) != 1) return -1;
    total += 16;
    return put_str(o, c, p, total);
}

/* JSON string as Python's json with ensure_ascii=False writes it */
static int json_str(gbuf *b, const uint8_t *p, size_t n) {
    if (gb_putc(b, '"')) return -1;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = p[i];
        const char *esc = NULL;
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default: break;
        }
        if (esc) {
            if (gb_put(b, esc, 2)) return -1;
        } else if (c < 0x20) {
            char u[6] = {'\\', 'u', '0', '0', HEX[c >> 4], HEX[c & 15]};
            if (gb_put(b, u, 6)) return -1;
        } else if (gb_putc(b, (char)c)) {
            return -1;
        }
    }
    return gb_putc(b, '"');
}

typedef struct {
    str_t trace_id, span_id, name;
    uint64_t start;
    int status_code;
    int has_exception, has_access;
    int bad;
    attrs_t attrs;
} span_t;

typedef struct {
    str_t service, host, device;
    int bad;
} res_t;

static const int64_t MIN_TIME_US = 946684800000000LL;
static const int64_t FUTURE_SLACK_US = 24LL * 3600 * 1000000;
#define MAX_PATIENTS 10000
#define MAX_SPAN_EXTRA ((size_t)1 << 20) /* _extract._MAX_SPAN_EXTRA_BYTES */
#define MAX_ATTRS 128
#define MAX_ROLES 256
#define MAX_ID 64 /* bytes of a trace or span id */

/* 1: rows emitted; 0: not eligible; -1: error (memory / crypto) */
static int emit_span(out_t *o, const span_t *sp, const res_t *res) {
    const attrs_t *as = &sp->attrs;
    if (sp->bad || res->bad || sp->has_access || as->n > MAX_ATTRS) return 0;
    const attr_t *slot[NMAPPED];
    signed char slot_ix[MAX_ATTRS];
    memset(slot, 0, sizeof(slot));
    for (size_t i = 0; i < as->n; i++) {
        int sl = slot_of(as->a[i].key);
        slot_ix[i] = (signed char)sl;
        if (sl >= 0) {
            if (slot[sl]) return 0; /* a duplicate key: the last one wins in Python */
            slot[sl] = &as->a[i];
        }
    }
    /* phi.audit.event true */
    const attr_t *ev = slot[S_PHI_AUDIT_EVENT];
    if (!ev) return 0;
    if (ev->kind == K_BOOL) {
        if (!ev->b) return 0;
    } else if (ev->kind == K_STR) {
        char lb[16];
        str_t l;
        if (!lower_ascii(ev->s, lb, sizeof(lb), &l) || !str_eq(l, "true")) return 0;
    } else {
        return 0;
    }
    size_t patient_items = 0; /* items of a phi.patient.id list (empty ones included) */
    for (size_t i = 0; i < as->n; i++) {
        const attr_t *a = &as->a[i];
        if (a->bad) return 0;
        for (size_t j = 0; j < i; j++)
            if (a->key.n == as->a[j].key.n && memcmp(a->key.p, as->a[j].key.p, a->key.n) == 0)
                return 0; /* a duplicate key: the last one wins in Python */
        if (str_eq(a->key, "db.system") || str_eq(a->key, "db.system.name") ||
            str_eq(a->key, "span.name"))
            return 0;
        if (a->kind == K_STR || a->kind == K_BOOL || a->kind == K_INT) continue;
        if (a->kind == K_ARRAY && (str_eq(a->key, "phi.patient.id") ||
                                   str_eq(a->key, "user.roles") ||
                                   str_eq(a->key, "enduser.role"))) {
            size_t cnt;
            int r = array_of_strings(a->s, &cnt);
            if (r < 0) return -2;
            if (str_eq(a->key, "phi.patient.id")) patient_items = cnt;
            if (r == 1 && cnt <= MAX_PATIENTS) continue;
        }
        return 0;
    }
    if (sp->trace_id.n > MAX_ID || sp->span_id.n > MAX_ID) return 0;
    int64_t t_us = (int64_t)(sp->start / 1000);
    if (sp->start > (uint64_t)INT64_MAX || t_us < MIN_TIME_US || t_us > o->now_us + FUTURE_SLACK_US)
        return 0;
    const attr_t *action = slot[S_PHI_AUDIT_ACTION];
    if (action && !(action->kind == K_STR && in_list(action->s, ACTIONS))) return 0;
    const attr_t *count = slot[S_PHI_RECORD_COUNT];
    if (count && !(count->kind == K_INT && count->i >= 0)) return 0;
    const attr_t *status = slot[S_HTTP_RESPONSE_STATUS_CODE];
    if (!status) status = slot[S_HTTP_STATUS_CODE];
    if (status && !(status->kind == K_INT && status->i >= 0 && status->i <= 999)) return 0;
    const attr_t *outcome = slot[S_PHI_AUDIT_OUTCOME];
    int explicit_ok = -1; /* -1 none, 1 success, 0 failure */
    if (outcome) {
        if (outcome->kind == K_BOOL) {
            explicit_ok = outcome->b ? 1 : 0;
        } else if (outcome->kind == K_STR) {
            char lb[16];
            str_t l;
            if (!lower_ascii(outcome->s, lb, sizeof(lb), &l)) return 0;
            if (in_list(l, SUCCESS)) explicit_ok = 1;
            else if (in_list(l, FAILURE)) explicit_ok = 0;
            else return 0;
        } else {
            return 0;
        }
    }
    const attr_t *roles = slot[S_USER_ROLES];
    if (!roles) roles = slot[S_ENDUSER_ROLE];
    if (roles && roles->kind != K_ARRAY) {
        if (roles->kind != K_STR) return 0;
        for (size_t i = 0; i < roles->s.n; i++)
            if (roles->s.p[i] < 0x20 || roles->s.p[i] > 0x7e) return 0;
    }
    const attr_t *patient = slot[S_PHI_PATIENT_ID];
    if (patient && patient->kind != K_STR && patient->kind != K_ARRAY) return 0;

    /* ---- eligible: the fields ---- */
    numbuf nb[12];
    const char *outcome_s, *reason_s;
    if (explicit_ok == 1) { outcome_s = "success"; reason_s = "explicit"; }
    else if (explicit_ok == 0) { outcome_s = "failure"; reason_s = "explicit"; }
    else if (sp->status_code == 2) { outcome_s = "failure"; reason_s = "status"; }
    else if (status && status->i >= 400) { outcome_s = "failure"; reason_s = "http"; }
    else if (sp->has_exception) { outcome_s = "failure"; reason_s = "exception"; }
    else { outcome_s = "success"; reason_s = "default"; }
    str_t act = action ? action->s : (str_t){(const uint8_t *)"", 0};
    if (act.n == 0) act = (str_t){(const uint8_t *)"unknown", 7};
    str_t actor = first_of(slot[S_ENDUSER_ID], slot[S_USER_ID], NULL, &nb[0]);
    str_t actor_type = text_of(slot[S_PHI_ACTOR_TYPE], &nb[1]);
    if (actor_type.n == 0 && actor.n > 0) actor_type = (str_t){(const uint8_t *)"user", 4};
    str_t client = first_of(slot[S_CLIENT_ADDRESS], slot[S_NET_PEER_IP],
                            slot[S_HTTP_CLIENT_IP], &nb[2]);
    str_t agent = first_of(slot[S_USER_AGENT_ORIGINAL], slot[S_HTTP_USER_AGENT], NULL,
                           &nb[3]);
    str_t method = first_of(slot[S_HTTP_REQUEST_METHOD], slot[S_HTTP_METHOD], NULL,
                            &nb[4]);
    str_t route = text_of(slot[S_HTTP_ROUTE], &nb[5]);
    str_t rtype = text_of(slot[S_PHI_RESOURCE_TYPE], &nb[6]);
    str_t rid = text_of(slot[S_PHI_RESOURCE_ID], &nb[7]);
    str_t query = text_of(slot[S_PHI_QUERY], &nb[8]);
    str_t purpose = text_of(slot[S_PHI_PURPOSE], &nb[9]);
    str_t recipient = text_of(slot[S_PHI_DISCLOSURE_RECIPIENT], &nb[10]);
    str_t device = text_of(slot[S_PHI_DEVICE_ID], &nb[11]);
    if (device.n == 0) device = res->device;
    uint64_t record_count = count ? (uint64_t)count->i : 0;
    uint16_t http_status = status ? (uint16_t)status->i : 0;

    /* the JSON of extra: the span name, then the attributes the mapping does not consume */
    gbuf *x = &o->extra;
    x->len = 0;
    if (gb_put(x, "{\"span.name\":", 13) || json_str(x, sp->name.p, sp->name.n)) return -1;
    for (size_t i = 0; i < as->n; i++) {
        const attr_t *a = &as->a[i];
        if (slot_ix[i] >= 0) continue;
        if (gb_putc(x, ',') || json_str(x, a->key.p, a->key.n) || gb_putc(x, ':')) return -1;
        numbuf t;
        if (a->kind == K_STR) {
            if (json_str(x, a->s.p, a->s.n)) return -1;
        } else {
            str_t v = text_of(a, &t);
            if (gb_put(x, v.p, v.n)) return -1;
        }
    }
    if (gb_putc(x, '}')) return -1;
    /* a span whose rows would carry this JSON more than MAX_SPAN_EXTRA bytes in all: Python
       stores it in the first row only (_extract._MAX_SPAN_EXTRA_BYTES), so the request is
       left to Python. At most `patient_items` rows: taking it means Python would not have
       shared. */
    if (patient_items >= 2 && x->len > MAX_SPAN_EXTRA / patient_items) return -3;

    /* roles (list) */
    str_t role_items[MAX_ROLES];
    size_t nroles = 0;
    if (roles && roles->kind == K_ARRAY) {
        rd_t r = {roles->s.p, roles->s.p + roles->s.n};
        fld_t f;
        int rc;
        while ((rc = next_field(&r, &f)) == 1) {
            if (f.field != 1) continue;
            attr_t v;
            memset(&v, 0, sizeof(v));
            parse_any(f.s, &v);
            if (nroles >= MAX_ROLES) return 0;
            role_items[nroles++] = v.s; /* every item is a string: checked above */
        }
    } else if (roles && roles->s.n > 0) {
        const uint8_t *p = roles->s.p, *end = p + roles->s.n;
        while (p <= end) {
            const uint8_t *q = p;
            while (q < end && *q != ',') q++;
            const uint8_t *a = p, *b = q;
            while (a < b && *a == ' ') a++;
            while (b > a && b[-1] == ' ') b--;
            if (b > a) {
                if (nroles >= MAX_ROLES) return 0;
                role_items[nroles++] = (str_t){a, (size_t)(b - a)};
            }
            p = q + 1;
        }
    }

    /* patients: one row each, or one row without a patient */
    str_t one = {(const uint8_t *)"", 0};
    size_t npat = 0;
    rd_t pr = {NULL, NULL};
    if (patient && patient->kind == K_ARRAY) {
        pr.p = patient->s.p;
        pr.end = patient->s.p + patient->s.n;
    } else if (patient && patient->s.n > 0) {
        one = patient->s;
        npat = 1;
    }
    char tid_hex[2 * MAX_ID], sid_hex[2 * MAX_ID];
    size_t tn = sp->trace_id.n, sn = sp->span_id.n; /* at most MAX_ID: checked above */
    hex_into(tid_hex, sp->trace_id.p, tn);
    hex_into(sid_hex, sp->span_id.p, sn);
    size_t index = 0;
    for (;;) {
        str_t pat = {(const uint8_t *)"", 0};
        if (pr.p) {
            fld_t f;
            int rc = next_field(&pr, &f);
            if (rc < 0) return -2;
            if (rc == 0) {
                if (index > 0) break;
                /* an empty list: one row without a patient */
            } else {
                if (f.field != 1) continue;
                attr_t v;
                memset(&v, 0, sizeof(v));
                parse_any(f.s, &v);
                if (v.s.n == 0) continue; /* Python drops empty ids */
                pat = v.s;
            }
        } else if (npat == 1) {
            pat = one;
        }
        /* a request that fans out past the row limit: Python refuses it (TooManyRows) */
        if (o->max_rows && o->rows >= o->max_rows) return -3;
        /* the event id: SHA-256("span|" trace_id span_id "|0|" index)[:16] */
        uint8_t digest[32], eid[16];
        char idx[24];
        size_t il = fmt_u(idx, index);
        gbuf *s = &o->plain;
        s->len = 0;
        if (gb_put(s, "span|", 5) || gb_put(s, sp->trace_id.p, sp->trace_id.n) ||
            gb_put(s, sp->span_id.p, sp->span_id.n) || gb_put(s, "|0|", 3) ||
            gb_put(s, idx, (size_t)il))
            return -1;
        if (sha256(s->p, s->len, digest)) return -1;
        memcpy(eid, digest, 16);
        char uuid[36];
        for (int i = 0, k = 0; i < 16; i++) {
            if (i == 4 || i == 6 || i == 8 || i == 10) uuid[k++] = '-';
            uuid[k++] = HEX[eid[i] >> 4];
            uuid[k++] = HEX[eid[i] & 15];
        }
        o->canon.len = 0;
        int64_t now = o->now_us;
        if (col_num(o, C_EVENT_ID, eid, 16) || canon_ns(o, uuid, 36)) return -1;
        if (col_num(o, C_EVENT_TIME, &t_us, 8) || canon_i(o, t_us)) return -1;
        if (col_num(o, C_RECEIVED_TIME, &now, 8) || canon_i(o, now)) return -1;
        if (put_str(o, C_TIME_SOURCE, "span", 4) || put_str(o, C_SOURCE, "span", 4)) return -1;
        if (put_str(o, C_ACTION, act.p, act.n)) return -1;
        if (put_str(o, C_OUTCOME, outcome_s, strlen(outcome_s))) return -1;
        if (put_str(o, C_OUTCOME_REASON, reason_s, strlen(reason_s))) return -1;
        if (put_str(o, C_ACTOR_ID, actor.p, actor.n)) return -1;
        if (put_str(o, C_ACTOR_TYPE, actor_type.p, actor_type.n)) return -1;
        {   /* actor_roles: list of binary; canonical: netstring of the items' netstrings */
            col_t *c = &o->c[C_ACTOR_ROLES];
            size_t inner = 0;
            for (size_t i = 0; i < nroles; i++) {
                if (gb_put(&c->data, role_items[i].p, role_items[i].n)) return -1;
                if (put_off(&c->child_offs, c->data.len)) return -1;
                char num[24];
                inner += fmt_u(num, role_items[i].n) + 1 + role_items[i].n;
            }
            if (put_off(&c->offs, c->child_offs.len / 4 - 1)) return -1;
            char num[24];
            size_t k = fmt_u(num, inner);
            num[k++] = ':';
            if (gb_put(&o->canon, num, k)) return -1;
            for (size_t i = 0; i < nroles; i++)
                if (canon_ns(o, role_items[i].p, role_items[i].n)) return -1;
        }
        if (put_str(o, C_SERVICE_NAME, res->service.p, res->service.n)) return -1;
        if (put_str(o, C_HOST_NAME, res->host.p, res->host.n)) return -1;
        if (put_str(o, C_RESOURCE_TYPE, rtype.p, rtype.n)) return -1;
        if (put_enc(o, C_RESOURCE_ID, "resource_id", eid, rid.p, rid.n)) return -1;
        if (rid.n) {
            gbuf *k = &o->plain;
            k->len = 0;
            if (gb_put(k, rtype.p, rtype.n) || gb_putc(k, '/') || gb_put(k, rid.p, rid.n))
                return -1;
            /* copy: put_bidx does not use o->plain */
            str_t key = {(const uint8_t *)k->p, k->len};
            if (put_bidx(o, C_RESOURCE_BIDX, "resource", key)) return -1;
        } else if (put_str(o, C_RESOURCE_BIDX, "", 0)) {
            return -1;
        }
        if (put_enc(o, C_PATIENT_ID, "patient_id", eid, pat.p, pat.n)) return -1;
        if (put_bidx(o, C_PATIENT_BIDX, "patient", pat)) return -1;
        if (col_num(o, C_RECORD_COUNT, &record_count, 8) || canon_u(o, record_count)) return -1;
        if (put_enc(o, C_QUERY, "query", eid, query.p, query.n)) return -1;
        if (put_str(o, C_PURPOSE, purpose.p, purpose.n)) return -1;
        if (put_enc(o, C_RECIPIENT, "recipient", eid, recipient.p, recipient.n)) return -1;
        if (put_enc(o, C_CLIENT_ADDRESS, "client_address", eid, client.p, client.n)) return -1;
        if (put_bidx(o, C_CLIENT_BIDX, "client", client)) return -1;
        if (put_str(o, C_USER_AGENT, agent.p, agent.n)) return -1;
        if (put_enc(o, C_DEVICE_ID, "device_id", eid, device.p, device.n)) return -1;
        if (put_str(o, C_HTTP_METHOD, method.p, method.n)) return -1;
        if (put_str(o, C_HTTP_ROUTE, route.p, route.n)) return -1;
        if (col_num(o, C_HTTP_STATUS, &http_status, 2) || canon_u(o, http_status)) return -1;
        if (put_str(o, C_TRACE_ID, tid_hex, 2 * tn) || put_str(o, C_SPAN_ID, sid_hex, 2 * sn))
            return -1;
        if (put_str(o, C_SENDER, o->sender, o->sender_n)) return -1;
        if (put_enc(o, C_EXTRA, "extra", eid, (const uint8_t *)x->p, x->len)) return -1;
        uint32_t key_id = ((uint32_t)o->key_hdr[0] << 24) | ((uint32_t)o->key_hdr[1] << 16) |
                          ((uint32_t)o->key_hdr[2] << 8) | o->key_hdr[3];
        if (col_num(o, C_KEY_ID, &key_id, 4) || canon_u(o, key_id)) return -1;
        /* the chain columns: filled by the writer; the hash slot carries the leaf */
        uint64_t zero = 0;
        uint8_t zeros[32] = {0}, leaf[32];
        if (col_bin(o, C_WRITER_ID, "", 0) || col_num(o, C_SEQ, &zero, 8) ||
            col_num(o, C_PREV_HASH, zeros, 32))
            return -1;
        if (sha256(o->canon.p, o->canon.len, leaf) || col_num(o, C_HASH, leaf, 32)) return -1;
        o->rows++;
        index++;
        if (!pr.p) break;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------- */
/* the request walk                                                                      */

/* Only service.name, host.name and device.id are read, so only their duplicates matter
   (the last one wins in Python); one pass, no pairwise comparison of the attributes: that
   was quadratic in their number (minutes for a request of a few hundred kB). */
static int parse_res(str_t m, res_t *res) {
    rd_t r = {m.p, m.p + m.n};
    fld_t f;
    int rc, seen = 0;
    while ((rc = next_field(&r, &f)) == 1) {
        if (f.field != 1) continue;
        if (f.wt != 2) { res->bad = 1; continue; }
        attr_t one;
        const attr_t *a = &one;
        if (parse_kv(f.s, &one) < 0) return -1;
        /* a bad attribute's key may not be protobuf's (a key field twice: the last one wins
           there, the first one here), so it may be service.name etc. under another key */
        if (a->bad) { res->bad = 1; continue; }
        int bit = str_eq(a->key, "service.name") ? 1 : str_eq(a->key, "host.name") ? 2
                  : str_eq(a->key, "device.id") ? 4 : 0;
        if (!bit) continue;
        if (seen & bit) res->bad = 1;
        seen |= bit;
        str_t *slot = bit == 1 ? &res->service : bit == 2 ? &res->host : &res->device;
        if (a->bad || !(a->kind == K_STR || a->kind == K_BOOL || a->kind == K_INT)) {
            res->bad = 1;
        } else if (a->kind == K_STR) {
            *slot = a->s;
        } else {
            /* text of a bool or int resource attribute: rare, the Python path does it */
            res->bad = 1;
        }
    }
    return rc < 0 ? -1 : 0;
}

static int parse_span(str_t m, span_t *sp) {
    rd_t r = {m.p, m.p + m.n};
    fld_t f;
    int rc, seen[16] = {0};
    sp->attrs.n = 0;
    sp->bad = sp->has_access = sp->has_exception = 0;
    sp->status_code = 0;
    sp->start = 0;
    sp->trace_id.n = sp->span_id.n = sp->name.n = 0;
    sp->trace_id.p = sp->span_id.p = sp->name.p = (const uint8_t *)"";
    while ((rc = next_field(&r, &f)) == 1) {
        switch (f.field) {
        case 1: case 2: case 5: case 7: case 15:
            if (seen[f.field]++) sp->bad = 1;
            break;
        default: break;
        }
        switch (f.field) {
        case 1: if (f.wt != 2) sp->bad = 1; else sp->trace_id = f.s; break;
        case 2: if (f.wt != 2) sp->bad = 1; else sp->span_id = f.s; break;
        case 5: if (f.wt != 2) sp->bad = 1; else sp->name = f.s; break;
        case 7: if (f.wt != 1) sp->bad = 1; else sp->start = f.v; break;
        case 9: {
            if (f.wt != 2) { sp->bad = 1; break; }
            attr_t a;
            if (parse_kv(f.s, &a) < 0) return -1;
            /* past MAX_ATTRS the span is left to Python: keep no more than that many */
            if (sp->attrs.n > MAX_ATTRS) { sp->bad = 1; break; }
            if (attrs_push(&sp->attrs, &a)) return -2;
            break;
        }
        case 11: {
            if (f.wt != 2) { sp->bad = 1; break; }
            rd_t er = {f.s.p, f.s.p + f.s.n};
            fld_t g;
            int erc, names = 0;
            while ((erc = next_field(&er, &g)) == 1) {
                if (g.field != 2) continue;
                if (g.wt != 2 || names++) { sp->bad = 1; continue; }
                if (str_eq(g.s, "phi.access")) sp->has_access = 1;
                if (str_eq(g.s, "exception")) sp->has_exception = 1;
            }
            if (erc < 0) return -1;
            break;
        }
        case 15: {
            if (f.wt != 2) { sp->bad = 1; break; }
            rd_t sr = {f.s.p, f.s.p + f.s.n};
            fld_t g;
            int src, codes = 0;
            while ((src = next_field(&sr, &g)) == 1) {
                if (g.field != 3) continue;
                if (g.wt != 0 || codes++) { sp->bad = 1; continue; }
                sp->status_code = (int)(int32_t)g.v;
            }
            if (src < 0) return -1;
            break;
        }
        default: break;
        }
    }
    return rc;
}

static void out_free(out_t *o) {
    for (int i = 0; i < NCOLS; i++) {
        gb_free(&o->c[i].data, 0);
        gb_free(&o->c[i].offs, 0);
        gb_free(&o->c[i].child_offs, 0);
    }
    OPENSSL_cleanse(o->nonces, sizeof(o->nonces));
    gb_free(&o->canon, 1);
    gb_free(&o->plain, 1);
    gb_free(&o->extra, 1);
    if (o->aes) EVP_CIPHER_CTX_free(o->aes);
    OPENSSL_cleanse(&o->hin, sizeof(o->hin));
    OPENSSL_cleanse(&o->hout, sizeof(o->hout));
    if (o->gcm) EVP_CIPHER_free(o->gcm);
}

typedef struct {
    gbuf ords; /* int32 ordinals (1-based) of the spans turned into rows */
    int32_t spans; /* spans walked (all of them when the walk succeeds) */
} walk_t;

/* the walk: ExportTraceServiceRequest.resource_spans(1) -> resource(1), scope_spans(2) ->
   spans(2). Returns 0, or -1 malformed, -2 out of memory / crypto failure. */
static int walk(out_t *o, str_t req, walk_t *w) {
    rd_t r = {req.p, req.p + req.n};
    fld_t f;
    int rc;
    int32_t ord = 0;
    span_t sp;
    memset(&sp, 0, sizeof(sp));
    int result = 0;
    while ((rc = next_field(&r, &f)) == 1) {
        if (f.field != 1) continue;
        if (f.wt != 2) { result = -1; goto done; }
        /* a ResourceSpans: its resource first (it may come after the scopes on the wire) */
        res_t res;
        memset(&res, 0, sizeof(res));
        res.service.p = res.host.p = res.device.p = (const uint8_t *)"";
        rd_t rr = {f.s.p, f.s.p + f.s.n};
        fld_t g;
        int grc, nres = 0;
        while ((grc = next_field(&rr, &g)) == 1) {
            if (g.field != 1) continue;
            if (g.wt != 2 || nres++) { res.bad = 1; continue; }
            int prc = parse_res(g.s, &res);
            if (prc) { result = prc; goto done; }
        }
        if (grc < 0) { result = -1; goto done; }
        rr.p = f.s.p;
        while ((grc = next_field(&rr, &g)) == 1) {
            if (g.field != 2) continue;
            if (g.wt != 2) { result = -1; goto done; }
            rd_t sr = {g.s.p, g.s.p + g.s.n};
            fld_t h;
            int hrc;
            while ((hrc = next_field(&sr, &h)) == 1) {
                if (h.field != 2) continue;
                if (h.wt != 2) { result = -1; goto done; }
                ord++;
                int prc = parse_span(h.s, &sp);
                if (prc) { result = prc; goto done; }
                int erc = emit_span(o, &sp, &res);
                if (erc == -3) { result = -1; goto done; }
                if (erc == -1) { result = -2; goto done; }
                if (erc == -2) { result = -1; goto done; }
                if (erc == 1 && gb_put(&w->ords, &ord, 4)) { result = -2; goto done; }
            }
            if (hrc < 0) { result = -1; goto done; }
        }
        if (grc < 0) { result = -1; goto done; }
    }
    if (rc < 0) result = -1;
    w->spans = ord;
done:
    free(sp.attrs.a);
    return result;
}

static PyObject *bytes_of(const gbuf *b) {
    return PyBytes_FromStringAndSize(b->p ? b->p : "", (Py_ssize_t)b->len);
}

/* extract(raw, now_us, sender, key_id, data_key, index_key[, max_rows[, validate]])
   -> None (not taken: use the Python path for the request), or
      (rows, ords, columns, spans) with ords the int32 ordinals as bytes, columns one tuple per
      column: (data, offsets, child_offsets) as bytes, and spans the request's number of spans;
      with validate, first validate() (as protobuf would): False when protobuf refuses the
      request, None when that is not decided here */
static PyObject *native_extract(PyObject *self, PyObject *args) {
    Py_buffer raw, dk, ik, snd;
    long long now_us;
    unsigned long key_id;
    (void)self;
    Py_ssize_t max_rows = 0;
    int check = 0;
    if (!PyArg_ParseTuple(args, "y*Ly*ky*y*|np", &raw, &now_us, &snd, &key_id, &dk, &ik,
                          &max_rows, &check))
        return NULL;
    PyObject *result = NULL;
    out_t o;
    walk_t w;
    memset(&o, 0, sizeof(o));
    memset(&w, 0, sizeof(w));
    if (dk.len != 32 || ik.len != 32 || key_id > 0xffffffffUL) {
        PyErr_SetString(PyExc_ValueError, "bad key material");
        goto out;
    }
    o.now_us = now_us;
    o.max_rows = max_rows > 0 ? (size_t)max_rows : 0;
    o.sender = snd.buf;
    o.sender_n = (size_t)snd.len;
    o.key_hdr[0] = (uint8_t)(key_id >> 24);
    o.key_hdr[1] = (uint8_t)(key_id >> 16);
    o.key_hdr[2] = (uint8_t)(key_id >> 8);
    o.key_hdr[3] = (uint8_t)key_id;
    o.gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    o.aes = EVP_CIPHER_CTX_new();
    if (!o.gcm || !o.aes) {
        PyErr_NoMemory();
        goto out;
    }
    {
        uint8_t pad[64];
        int ok = EVP_EncryptInit_ex(o.aes, o.gcm, NULL, dk.buf, NULL) == 1;
        memset(pad, 0x36, 64);
        for (int i = 0; i < 32; i++) pad[i] ^= ((const uint8_t *)ik.buf)[i];
        ok = ok && SHA256_Init(&o.hin) == 1 && SHA256_Update(&o.hin, pad, 64) == 1;
        memset(pad, 0x5c, 64);
        for (int i = 0; i < 32; i++) pad[i] ^= ((const uint8_t *)ik.buf)[i];
        ok = ok && SHA256_Init(&o.hout) == 1 && SHA256_Update(&o.hout, pad, 64) == 1;
        OPENSSL_cleanse(pad, sizeof(pad));
        if (!ok) {
            PyErr_SetString(PyExc_RuntimeError, "libcrypto initialisation failed");
            goto out;
        }
    }
    for (int i = 0; i < NCOLS; i++) {
        /* Arrow offsets start at 0 */
        if (COLUMN_LAYOUTS[i][0] == 'b' || COLUMN_LAYOUTS[i][0] == 'l') {
            if (put_off(&o.c[i].offs, 0)) { PyErr_NoMemory(); goto out; }
        }
        if (COLUMN_LAYOUTS[i][0] == 'l' && put_off(&o.c[i].child_offs, 0)) {
            PyErr_NoMemory();
            goto out;
        }
    }
    int rc, valid = 1;
    size_t spans = 0;
    str_t req = {raw.buf, (size_t)raw.len};
    Py_BEGIN_ALLOW_THREADS
    if (check) valid = validate(req, &spans);
    rc = valid == 1 ? walk(&o, req, &w) : -1;
    /* the walk counts the spans as protobuf does once the request is valid; should the two
       ever differ, the request is not taken (Python then parses it) */
    if (rc == 0 && check && spans != (size_t)w.spans) rc = -1;
    Py_END_ALLOW_THREADS
    if (valid == 0) {
        result = Py_False;
        Py_INCREF(result);
        goto out;
    }
    if (rc == -1) {
        result = Py_None;
        Py_INCREF(result);
        goto out;
    }
    if (rc == -2) {
        PyErr_SetString(PyExc_MemoryError, "native extraction failed (memory or libcrypto)");
        goto out;
    }
    PyObject *cols = PyTuple_New(NCOLS);
    if (!cols) goto out;
    for (int i = 0; i < NCOLS; i++) {
        col_t *c = &o.c[i];
        PyObject *t = Py_BuildValue("(NNN)", bytes_of(&c->data), bytes_of(&c->offs),
                                    bytes_of(&c->child_offs));
        if (!t) { Py_DECREF(cols); goto out; }
        PyTuple_SET_ITEM(cols, i, t);
    }
    result = Py_BuildValue("(nNNn)", (Py_ssize_t)o.rows, bytes_of(&w.ords), cols,
                           (Py_ssize_t)w.spans);
out:
    gb_free(&w.ords, 0);
    out_free(&o);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&snd);
    PyBuffer_Release(&dk);
    PyBuffer_Release(&ik);
    return result;
}

/* validate_traces(raw) -> (True, spans) when protobuf (upb) accepts raw as an
   ExportTraceServiceRequest, (False, 0) when it refuses it, (None, 0) when not decided here;
   the GIL is released while it runs */
static PyObject *native_validate_traces(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer raw;
    if (!PyArg_ParseTuple(args, "y*", &raw)) return NULL;
    str_t req = {raw.buf, (size_t)raw.len};
    size_t spans = 0;
    int valid;
    Py_BEGIN_ALLOW_THREADS
    valid = validate(req, &spans);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&raw);
    return Py_BuildValue("(On)", valid < 0 ? Py_None : valid ? Py_True : Py_False,
                         (Py_ssize_t)spans);
}

/* link(leaves, writer_id, seq, head) -> hashes: the hash chain over n leaves (32 bytes each),
 * continuing (seq, head), exactly as phiaudit.storage's link_arrow computes it in Python:
 * hash_i = SHA-256(prev ‖ ns(writer_id) ‖ ns(decimal seq_i) ‖ leaf_i), ns(x) = len(x) ":" x.
 * Returns the n hashes joined; the GIL is released while it runs. */
static PyObject *native_link(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer lv = {0}, wid = {0}, head = {0};
    unsigned long long seq = 0;
    PyObject *result = NULL;
    uint8_t *buf = NULL;
    int failed = 0;
    if (!PyArg_ParseTuple(args, "y*y*Ky*", &lv, &wid, &seq, &head)) return NULL;
    if (lv.len % 32 != 0 || head.len != 32 || wid.len > 4096) {
        PyErr_SetString(PyExc_ValueError, "leaves must be 32-byte digests, head 32 bytes");
        goto out;
    }
    Py_ssize_t n = lv.len / 32;
    if ((unsigned long long)n > ULLONG_MAX - seq) {
        PyErr_SetString(PyExc_OverflowError, "sequence number overflow");
        goto out;
    }
    result = PyBytes_FromStringAndSize(NULL, n * 32);
    /* prev(32) + ns(writer) + ns(seq: at most 20 digits) + leaf(32) */
    buf = (uint8_t *)malloc(32 + 8 + (size_t)wid.len + 24 + 32);
    if (!result || !buf) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        Py_CLEAR(result);
        goto out;
    }
    uint8_t *hashes = (uint8_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *prev = (const uint8_t *)head.buf;
    int wn = snprintf((char *)buf + 32, 8, "%zd:", wid.len);
    memcpy(buf + 32 + wn, wid.buf, (size_t)wid.len);
    size_t fixed = 32 + (size_t)wn + (size_t)wid.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        char num[24]; /* fmt_u, not snprintf: two snprintf calls a row were ~40% of the
                         link's time (0.51 -> 0.29 us a row) */
        size_t dn = fmt_u(num, seq + 1 + (unsigned long long)i);
        memcpy(buf, prev, 32);
        size_t at = fixed;
        at += fmt_u((char *)buf + at, dn);
        buf[at++] = ':';
        memcpy(buf + at, num, dn);
        at += dn;
        memcpy(buf + at, (const uint8_t *)lv.buf + 32 * i, 32);
        at += 32;
        if (sha256(buf, at, hashes + 32 * i)) {
            failed = 1;
            break;
        }
        prev = hashes + 32 * i;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed");
    }
out:
    free(buf);
    PyBuffer_Release(&lv);
    PyBuffer_Release(&wid);
    PyBuffer_Release(&head);
    return result;
}

/* ------------------------------------------------------------------------------------- */
/* Arrow columns -> one block of ClickHouse's Native format                              */

/* native_block(nrows, columns) -> bytes: one Native block (varint column count, varint row
 * count, then per column its name, its type and its values), the input format the embedded
 * engine parses with the least work: ~5 ms less than the same rows as an Arrow stream per
 * 4,096-row insert into audit_events (bench/README.md). columns: (name, type, kind, chunks)
 * with chunks of the column's Arrow arrays (no nulls: the caller checks), by kind:
 *   'F' fixed width w (integers, timestamps, fixed-size binary): (offset, length, w, data)
 *   'U' UUID from 16-byte binary (RFC 4122 byte order):          (offset, length, 16, data)
 *   'S' binary/string, int32 offsets:                            (offset, length, offsets, data)
 *   'A' list of binary, int32 offsets: (offset, length, list_offsets, child_offset,
 *                                       child_offsets, child_data)
 *   'L' LowCardinality(String) from binary:             the chunks of 'S'
 *   'M' Array(LowCardinality(String)) from list of binary: the chunks of 'A'
 * 'L' and 'M' columns go dictionary-encoded, as the engine writes them itself (the key
 * version, then the index width and flags, the keys with the default "" first, the indexes):
 * the engine then hashes each distinct value once instead of converting every row of a
 * String column (~3 ms less per 4,096-row insert into audit_events, bench/README.md).
 * Every offset and length is checked against its buffer; anything out of bounds raises
 * ValueError (the caller then inserts the Arrow stream). The GIL is released while copying. */

#define NB_MAX_BUFS 4

typedef struct {
    char kind;
    Py_ssize_t offset, length, width, child_offset;
    Py_buffer b[NB_MAX_BUFS];
    int nb;
} nb_chunk;

/* a LowCardinality column's dictionary: keys[0] is the default "", idx one key per value */
typedef struct {
    const uint8_t **key_p;
    uint32_t *key_n;
    uint32_t nkeys;
    uint32_t *idx;
    size_t nvalues;
    size_t keys_size; /* the keys in Native: varint length + bytes each */
} nb_dict;

typedef struct {
    Py_buffer name, type;
    char kind;
    nb_chunk *chunks;
    Py_ssize_t nchunks;
    nb_dict dict;
} nb_col;

static size_t varint_len(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *put_varint(uint8_t *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static int32_t rd_i32(const Py_buffer *b, Py_ssize_t i) {
    int32_t v;
    memcpy(&v, (const char *)b->buf + 4 * i, 4);
    return v;
}

/* the i32 offsets [first, first + n] of buffer b are within it, non-decreasing and within
   [0, data_len]; returns 0 if so */
static int nb_offsets_ok(const Py_buffer *offs, Py_ssize_t first, Py_ssize_t n,
                         Py_ssize_t data_len) {
    if (first < 0 || n < 0 || (first + n + 1) > offs->len / 4) return -1;
    int32_t prev = rd_i32(offs, first);
    if (prev < 0) return -1;
    for (Py_ssize_t i = 1; i <= n; i++) {
        int32_t v = rd_i32(offs, first + i);
        if (v < prev) return -1;
        prev = v;
    }
    return prev <= data_len ? 0 : -1;
}

/* size of a chunk's values in Native, or -1 when its buffers do not hold what it claims */
static Py_ssize_t nb_chunk_size(const nb_chunk *c) {
    Py_ssize_t n = c->length;
    switch (c->kind) {
    case 'F':
    case 'U':
        if (c->width <= 0 || (c->kind == 'U' && c->width != 16)) return -1;
        if (c->offset < 0 || n < 0 || c->offset + n > c->b[0].len / c->width) return -1;
        return n * c->width;
    case 'S': {
        if (nb_offsets_ok(&c->b[0], c->offset, n, c->b[1].len)) return -1;
        Py_ssize_t size = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t a = rd_i32(&c->b[0], c->offset + i), e = rd_i32(&c->b[0], c->offset + i + 1);
            size += (Py_ssize_t)varint_len((uint64_t)(e - a)) + (e - a);
        }
        return size;
    }
    case 'A': {
        /* list offsets index the child array, which starts at child_offset */
        if (nb_offsets_ok(&c->b[0], c->offset, n, PY_SSIZE_T_MAX)) return -1;
        int32_t lo = rd_i32(&c->b[0], c->offset), hi = rd_i32(&c->b[0], c->offset + n);
        if (c->child_offset < 0 ||
            nb_offsets_ok(&c->b[1], c->child_offset + lo, hi - lo, c->b[2].len))
            return -1;
        Py_ssize_t size = 8 * n;
        for (Py_ssize_t j = lo; j < hi; j++) {
            int32_t a = rd_i32(&c->b[1], c->child_offset + j);
            int32_t e = rd_i32(&c->b[1], c->child_offset + j + 1);
            size += (Py_ssize_t)varint_len((uint64_t)(e - a)) + (e - a);
        }
        return size;
    }
    }
    return -1;
}

/* writes a chunk's values; Array columns write offsets for every chunk first (see below) */
static uint8_t *nb_chunk_write(const nb_chunk *c, uint8_t *p) {
    Py_ssize_t n = c->length;
    const uint8_t *d;
    switch (c->kind) {
    case 'F':
        memcpy(p, (const char *)c->b[0].buf + c->offset * c->width, (size_t)(n * c->width));
        return p + n * c->width;
    case 'U':
        /* ClickHouse keeps a UUID as two little-endian 64-bit halves, high half first */
        d = (const uint8_t *)c->b[0].buf + c->offset * 16;
        for (Py_ssize_t i = 0; i < n; i++, d += 16, p += 16)
            for (int k = 0; k < 8; k++) {
                p[k] = d[7 - k];
                p[8 + k] = d[15 - k];
            }
        return p;
    case 'S':
        d = (const uint8_t *)c->b[1].buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t a = rd_i32(&c->b[0], c->offset + i), e = rd_i32(&c->b[0], c->offset + i + 1);
            p = put_varint(p, (uint64_t)(e - a));
            memcpy(p, d + a, (size_t)(e - a));
            p += e - a;
        }
        return p;
    case 'A': {
        int32_t lo = rd_i32(&c->b[0], c->offset), hi = rd_i32(&c->b[0], c->offset + n);
        d = (const uint8_t *)c->b[2].buf;
        for (int32_t j = lo; j < hi; j++) {
            int32_t a = rd_i32(&c->b[1], c->child_offset + j);
            int32_t e = rd_i32(&c->b[1], c->child_offset + j + 1);
            p = put_varint(p, (uint64_t)(e - a));
            memcpy(p, d + a, (size_t)(e - a));
            p += e - a;
        }
        return p;
    }
    }
    return p;
}

static uint64_t nb_hash(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL ^ (uint64_t)n;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h ^ (h >> 29);
}

static void nb_dict_free(nb_dict *d) {
    PyMem_RawFree(d->key_p);
    PyMem_RawFree(d->key_n);
    PyMem_RawFree(d->idx);
    memset(d, 0, sizeof(*d));
}

/* the values of a chunk of an 'L' (its rows) or 'M' (its arrays' items) column: indexes
   [first, last) into the value offsets, which are c->b[0] ('L') or c->b[1] ('M') */
static void nb_value_range(char kind, const nb_chunk *c, Py_ssize_t *first, Py_ssize_t *last) {
    if (kind == 'L') {
        *first = c->offset;
        *last = c->offset + c->length;
    } else {
        *first = c->child_offset + rd_i32(&c->b[0], c->offset);
        *last = c->child_offset + rd_i32(&c->b[0], c->offset + c->length);
    }
}

/* the column's values (every chunk's, in order) as keys and one index per value; the chunks
   were checked by nb_chunk_size. Returns -1 when out of memory. No GIL needed. */
static int nb_dict_build(nb_col *col) {
    nb_dict *d = &col->dict;
    size_t nvalues = 0;
    Py_ssize_t first, last;
    for (Py_ssize_t j = 0; j < col->nchunks; j++) {
        nb_value_range(col->kind, &col->chunks[j], &first, &last);
        nvalues += (size_t)(last - first);
    }
    if (nvalues >= 0xffffffffu) return -1;
    size_t cap = 16;
    while (cap < 2 * (nvalues + 1)) cap <<= 1;
    uint32_t *slots = PyMem_RawCalloc(cap, sizeof(uint32_t)); /* key index + 1; 0: empty */
    d->key_p = PyMem_RawMalloc((nvalues + 1) * sizeof(*d->key_p));
    d->key_n = PyMem_RawMalloc((nvalues + 1) * sizeof(*d->key_n));
    d->idx = PyMem_RawMalloc((nvalues ? nvalues : 1) * sizeof(*d->idx));
    if (!slots || !d->key_p || !d->key_n || !d->idx) {
        PyMem_RawFree(slots);
        nb_dict_free(d);
        return -1;
    }
    static const uint8_t empty = 0;
    d->key_p[0] = &empty;
    d->key_n[0] = 0;
    d->nkeys = 1;
    d->keys_size = 1;
    slots[nb_hash(&empty, 0) & (cap - 1)] = 1;
    const uint8_t *prev_p = &empty;
    uint32_t prev_n = 0, prev_k = 0;
    size_t v = 0;
    for (Py_ssize_t j = 0; j < col->nchunks; j++) {
        const nb_chunk *c = &col->chunks[j];
        const Py_buffer *offs = col->kind == 'L' ? &c->b[0] : &c->b[1];
        const uint8_t *data = (const uint8_t *)(col->kind == 'L' ? c->b[1].buf : c->b[2].buf);
        nb_value_range(col->kind, c, &first, &last);
        for (Py_ssize_t i = first; i < last; i++) {
            int32_t a = rd_i32(offs, i), e = rd_i32(offs, i + 1);
            const uint8_t *p = data + a;
            uint32_t n = (uint32_t)(e - a);
            /* a run of one value (service, host, sender, writer...) costs one comparison */
            if (n != prev_n || (n && memcmp(p, prev_p, n) != 0)) {
                size_t s = (size_t)nb_hash(p, n) & (cap - 1);
                for (;;) {
                    uint32_t k = slots[s];
                    if (!k) {
                        k = d->nkeys++;
                        d->key_p[k] = p;
                        d->key_n[k] = n;
                        d->keys_size += varint_len(n) + n;
                        slots[s] = k + 1;
                        prev_k = k;
                        break;
                    }
                    k--;
                    if (d->key_n[k] == n && (n == 0 || memcmp(d->key_p[k], p, n) == 0)) {
                        prev_k = k;
                        break;
                    }
                    s = (s + 1) & (cap - 1);
                }
                prev_p = p;
                prev_n = n;
            }
            d->idx[v++] = prev_k;
        }
    }
    d->nvalues = v;
    PyMem_RawFree(slots);
    return 0;
}

static int nb_index_width(uint32_t nkeys) {
    return nkeys <= 0x100 ? 1 : nkeys <= 0x10000 ? 2 : 4;
}

/* the dictionary-encoded values in Native, after the key version (and an Array's offsets);
   none at all without values (arrays all empty), as the engine writes it */
static size_t nb_dict_size(const nb_dict *d) {
    if (!d->nvalues) return 0;
    return 8 + 8 + d->keys_size + 8 + d->nvalues * (size_t)nb_index_width(d->nkeys);
}

static uint8_t *put_u64(uint8_t *p, uint64_t v) {
    memcpy(p, &v, 8);
    return p + 8;
}

static uint8_t *nb_dict_write(const nb_dict *d, uint8_t *p) {
    if (!d->nvalues) return p;
    int w = nb_index_width(d->nkeys);
    /* index type (0: UInt8, 1: UInt16, 2: UInt32) | HasAdditionalKeys | NeedUpdateDictionary */
    p = put_u64(p, (uint64_t)(w == 1 ? 0 : w == 2 ? 1 : 2) | (1u << 9) | (1u << 10));
    p = put_u64(p, d->nkeys);
    for (uint32_t k = 0; k < d->nkeys; k++) {
        p = put_varint(p, d->key_n[k]);
        if (d->key_n[k]) memcpy(p, d->key_p[k], d->key_n[k]);
        p += d->key_n[k];
    }
    p = put_u64(p, d->nvalues);
    for (size_t i = 0; i < d->nvalues; i++) {
        uint32_t k = d->idx[i];
        if (w == 1) {
            *p++ = (uint8_t)k;
        } else if (w == 2) {
            uint16_t x = (uint16_t)k;
            memcpy(p, &x, 2);
            p += 2;
        } else {
            memcpy(p, &k, 4);
            p += 4;
        }
    }
    return p;
}

static void nb_free(nb_col *cols, Py_ssize_t ncols) {
    if (!cols) return;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        PyBuffer_Release(&cols[i].name);
        PyBuffer_Release(&cols[i].type);
        for (Py_ssize_t j = 0; j < cols[i].nchunks; j++)
            for (int k = 0; k < cols[i].chunks[j].nb; k++) PyBuffer_Release(&cols[i].chunks[j].b[k]);
        PyMem_Free(cols[i].chunks);
        nb_dict_free(&cols[i].dict);
    }
    PyMem_Free(cols);
}

static int nb_parse_chunk(PyObject *t, char kind, nb_chunk *c) {
    kind = kind == 'L' ? 'S' : kind == 'M' ? 'A' : kind; /* the same buffers */
    c->kind = kind;
    int ok = 0;
    switch (kind) {
    case 'F':
    case 'U':
        ok = PyArg_ParseTuple(t, "nnny*", &c->offset, &c->length, &c->width, &c->b[0]);
        c->nb = ok ? 1 : 0;
        break;
    case 'S':
        ok = PyArg_ParseTuple(t, "nny*y*", &c->offset, &c->length, &c->b[0], &c->b[1]);
        c->nb = ok ? 2 : 0;
        break;
    case 'A':
        ok = PyArg_ParseTuple(t, "nny*ny*y*", &c->offset, &c->length, &c->b[0],
                              &c->child_offset, &c->b[1], &c->b[2]);
        c->nb = ok ? 3 : 0;
        break;
    default:
        PyErr_SetString(PyExc_ValueError, "unknown column kind");
    }
    return ok ? 0 : -1;
}

static PyObject *native_block(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t nrows;
    PyObject *spec, *result = NULL;
    if (!PyArg_ParseTuple(args, "nO!", &nrows, &PyList_Type, &spec)) return NULL;
    Py_ssize_t ncols = PyList_GET_SIZE(spec);
    if (nrows < 0 || ncols <= 0) {
        PyErr_SetString(PyExc_ValueError, "a block needs columns and a row count");
        return NULL;
    }
    nb_col *cols = PyMem_Calloc((size_t)ncols, sizeof(nb_col));
    if (!cols) return PyErr_NoMemory();
    Py_ssize_t parsed = 0;
    for (; parsed < ncols; parsed++) {
        nb_col *col = &cols[parsed];
        PyObject *chunks;
        int kind;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(spec, parsed), "y*y*CO!", &col->name, &col->type,
                              &kind, &PyList_Type, &chunks))
            goto fail;
        col->kind = (char)kind;
        Py_ssize_t nchunks = PyList_GET_SIZE(chunks);
        col->chunks = PyMem_Calloc((size_t)(nchunks ? nchunks : 1), sizeof(nb_chunk));
        if (!col->chunks) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t j = 0; j < nchunks; j++) {
            if (!PyTuple_Check(PyList_GET_ITEM(chunks, j))) {
                PyErr_SetString(PyExc_TypeError, "a chunk is a tuple");
                goto fail;
            }
            if (nb_parse_chunk(PyList_GET_ITEM(chunks, j), col->kind, &col->chunks[j])) goto fail;
            col->nchunks = j + 1;
        }
    }
    /* sizes (and bounds) first, then one allocation */
    size_t total = varint_len((uint64_t)ncols) + varint_len((uint64_t)nrows);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < ncols && !bad; i++) {
        nb_col *col = &cols[i];
        Py_ssize_t rows = 0;
        total += varint_len((uint64_t)col->name.len) + (size_t)col->name.len +
                 varint_len((uint64_t)col->type.len) + (size_t)col->type.len;
        int dict = col->kind == 'L' || col->kind == 'M';
        for (Py_ssize_t j = 0; j < col->nchunks; j++) {
            Py_ssize_t size = nb_chunk_size(&col->chunks[j]);
            if (size < 0) {
                bad = 1;
                break;
            }
            if (!dict) total += (size_t)size;
            rows += col->chunks[j].length;
        }
        if (rows != nrows) bad = 1;
        if (!bad && dict) {
            if (nb_dict_build(col)) {
                bad = 2;
                break;
            }
            /* the key version, an Array's end offsets, the dictionary-encoded values */
            total += 8 + (col->kind == 'M' ? 8 * (size_t)nrows : 0) + nb_dict_size(&col->dict);
        }
    }
    Py_END_ALLOW_THREADS
    if (bad == 2) {
        PyErr_NoMemory();
        goto fail;
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "a column's buffers do not hold its rows");
        goto fail;
    }
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!result) goto fail;
    uint8_t *start = (uint8_t *)PyBytes_AS_STRING(result), *p = start;
    Py_BEGIN_ALLOW_THREADS
    p = put_varint(p, (uint64_t)ncols);
    p = put_varint(p, (uint64_t)nrows);
    for (Py_ssize_t i = 0; i < ncols; i++) {
        nb_col *col = &cols[i];
        p = put_varint(p, (uint64_t)col->name.len);
        memcpy(p, col->name.buf, (size_t)col->name.len);
        p += col->name.len;
        p = put_varint(p, (uint64_t)col->type.len);
        memcpy(p, col->type.buf, (size_t)col->type.len);
        p += col->type.len;
        if (col->kind == 'L' || col->kind == 'M')
            p = put_u64(p, 1); /* keys: SharedDictionariesWithAdditionalKeys */
        if (col->kind == 'A' || col->kind == 'M') {
            /* Array: every row's end offset (UInt64), then the values */
            uint64_t end = 0;
            for (Py_ssize_t j = 0; j < col->nchunks; j++) {
                const nb_chunk *c = &col->chunks[j];
                for (Py_ssize_t r = 0; r < c->length; r++) {
                    end += (uint64_t)(rd_i32(&c->b[0], c->offset + r + 1) -
                                      rd_i32(&c->b[0], c->offset + r));
                    memcpy(p, &end, 8);
                    p += 8;
                }
            }
        }
        if (col->kind == 'L' || col->kind == 'M')
            p = nb_dict_write(&col->dict, p);
        else
            for (Py_ssize_t j = 0; j < col->nchunks; j++) p = nb_chunk_write(&col->chunks[j], p);
    }
    Py_END_ALLOW_THREADS
    if ((size_t)(p - start) != total) { /* cannot happen: the sizes above are exact */
        Py_CLEAR(result);
        PyErr_SetString(PyExc_RuntimeError, "Native block size mismatch");
    }
    nb_free(cols, ncols);
    return result;
fail:
    Py_XDECREF(result);
    nb_free(cols, ncols);
    return NULL;
}

/* ------------------------------------------------------------------------------------- */
/* The checkpointer's fold: a writer's stored rows, checked and folded into RFC 6962 roots */

/* chain_fold(rows, start, head, block) -> (roots, last) | None. rows: the writer's rows
 * start+1 .. start+n in seq order, 72 bytes each (seq as UInt64 little-endian, prev_hash,
 * hash), n a multiple of block (a power of two). Checks that they are exactly those sequence
 * numbers, each linked to the one before (the first to head), and folds each block of their
 * chain hashes into the root of its perfect subtree (leaf SHA-256(0x00 || hash), node
 * SHA-256(0x01 || left || right)), as storage's block_roots does in SQL at about a third of
 * its cost. None when a row is missing, repeated or unlinked. The GIL is released. */
#define CHAIN_ROW 72 /* storage's CHAIN_ROW_BYTES: seq (UInt64 LE), prev_hash, hash */

static PyObject *native_chain_fold(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer rows, head;
    unsigned long long start;
    Py_ssize_t block;
    PyObject *roots = NULL, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*Ky*n", &rows, &start, &head, &block)) return NULL;
    Py_ssize_t n = rows.len / CHAIN_ROW;
    int levels = 0;
    while (levels < 31 && ((Py_ssize_t)1 << levels) < block) levels++;
    if (head.len != 32 || block <= 0 || ((Py_ssize_t)1 << levels) != block ||
        rows.len % CHAIN_ROW || n % block || (unsigned long long)n > ULLONG_MAX - start) {
        PyErr_SetString(PyExc_ValueError, "chain_fold: rows of 72 bytes, whole blocks, a "
                                          "32-byte head and a power-of-two block");
        goto out;
    }
    roots = PyBytes_FromStringAndSize(NULL, (n / block) * 32);
    if (!roots) goto out;
    uint8_t last[32], stack[32 * 32];
    int linked = 1, hashed = 1;
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *r = (const uint8_t *)rows.buf;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(roots);
    memcpy(last, head.buf, 32);
    for (Py_ssize_t i = 0; i < n && linked && hashed; i++, r += CHAIN_ROW) {
        uint64_t seq;
        memcpy(&seq, r, 8);
        if (seq != start + 1 + (unsigned long long)i || memcmp(r + 8, last, 32) != 0) {
            linked = 0;
            break;
        }
        memcpy(last, r + 40, 32);
        uint8_t buf[65], h[32];
        buf[0] = 0x00; /* leaf */
        memcpy(buf + 1, last, 32);
        hashed = sha256(buf, 33, h) == 0;
        Py_ssize_t k = i % block;
        int lvl = 0;
        for (; hashed && (k >> lvl) & 1; lvl++) {
            buf[0] = 0x01; /* node: the left sibling waiting at this level, then h */
            memcpy(buf + 1, stack + 32 * lvl, 32);
            memcpy(buf + 33, h, 32);
            hashed = sha256(buf, 65, h) == 0;
        }
        if (lvl == levels) {
            memcpy(out, h, 32);
            out += 32;
        } else {
            memcpy(stack + 32 * lvl, h, 32);
        }
    }
    Py_END_ALLOW_THREADS
    if (!hashed) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto failed");
        goto out;
    }
    if (!linked) {
        result = Py_NewRef(Py_None);
        goto out;
    }
    result = Py_BuildValue("(Oy#)", roots, (const char *)last, (Py_ssize_t)32);
out:
    Py_XDECREF(roots);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&head);
    return result;
}

static PyMethodDef methods[] = {
    {"extract", native_extract, METH_VARARGS,
     "extract(raw, now_us, sender, key_id, data_key, index_key[, max_rows[, validate]]) -> "
     "None | False | (rows, ords, columns, spans)"},
    {"validate_traces", native_validate_traces, METH_VARARGS,
     "validate_traces(raw) -> (True | False | None, spans): protobuf's verdict on raw"},
    {"native_block", native_block, METH_VARARGS,
     "native_block(nrows, columns) -> bytes: Arrow columns as one ClickHouse Native block"},
    {"chain_fold", native_chain_fold, METH_VARARGS,
     "chain_fold(rows, start, head, block) -> (roots, last) | None: stored rows checked and "
     "folded into RFC 6962 subtree roots"},
    {"link", native_link, METH_VARARGS,
     "link(leaves, writer_id, seq, head) -> the chain's hashes, 32 bytes each, joined"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native",
                                    "Compiled extractor for audit spans (see _native.c).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    uint16_t probe = 1;
    for (int i = 0; i < NMAPPED; i++) MAPPED_LEN[i] = strlen(MAPPED[i]);
    if (*(uint8_t *)&probe != 1) {
        PyErr_SetString(PyExc_ImportError, "_native needs a little-endian machine");
        return NULL;
    }
    if (v_init()) {
        PyErr_SetString(PyExc_ImportError, "_native: the validator's tables are too small");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *names = PyTuple_New(NCOLS), *layouts = PyTuple_New(NCOLS);
    if (!names || !layouts) return NULL;
    for (int i = 0; i < NCOLS; i++) {
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(COLUMN_NAMES[i]));
        PyTuple_SET_ITEM(layouts, i, PyUnicode_FromString(COLUMN_LAYOUTS[i]));
    }
    PyModule_AddObject(m, "COLUMNS", names);
    PyModule_AddObject(m, "LAYOUTS", layouts);
    /* the validator's schema: ((message, ((number, kind, message or ""), ...)), ...) */
    PyObject *schema = PyTuple_New(NMSGS);
    if (!schema) return NULL;
    for (int i = 0; i < NMSGS; i++) {
        const vmsg_t *vm = &TRACE_SCHEMA[i];
        Py_ssize_t nf = 0;
        while (vm->fields[nf].number) nf++;
        PyObject *fields = PyTuple_New(nf);
        if (!fields) return NULL;
        for (Py_ssize_t k = 0; k < nf; k++) {
            const vfield_t *f = &vm->fields[k];
            PyObject *t = Py_BuildValue("(iss)", f->number, V_KIND_NAMES[f->kind],
                                        f->kind == V_MESSAGE ? TRACE_SCHEMA[f->msg].name : "");
            if (!t) return NULL;
            PyTuple_SET_ITEM(fields, k, t);
        }
        PyObject *t = Py_BuildValue("(sN)", vm->name, fields);
        if (!t) return NULL;
        PyTuple_SET_ITEM(schema, i, t);
    }
    PyModule_AddObject(m, "TRACE_SCHEMA", schema);
    PyModule_AddIntConstant(m, "MAX_DEPTH", PB_MAX_DEPTH);
    return m;
}
