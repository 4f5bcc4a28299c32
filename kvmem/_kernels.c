/* kvmem's compiled kernels, both on the CPU search path:

   - push: the running top-k of the exact search, fused with its blocked scoring;
   - gather: the rows an approximate search returns, gathered and scored exactly in one pass.

   The running top-k of kvmem's exact CPU search, fused with its blocked scoring.

   kvmem.topk scores a cache-sized block of keys at a time with NumPy's BLAS and
   hands the block here while it is still in cache. Each query row keeps a
   min-heap of its best `keep` (score, column) pairs; the heap's root is the
   running threshold. A block's columns are read 32 at a time and compared with
   the threshold (four-wide vector compares, or-ed); only chunks holding
   a score above it are walked one by one. After the first blocks almost none
   are, so the selection costs one read of the scores, in cache.

   push(scores, first, limits, values, columns)
     scores   (R, b) float32, C-contiguous: ranking scores of R query rows against
              columns first .. first + b - 1
     limits   (R,) int64 or None: row r ignores columns >= limits[r] (rows of a
              partition holding fewer keys than the block reaches)
     values   (R, keep) float32, columns (R, keep) int64: the heaps, updated in
              place; start them at -inf and -1.
   A score enters a heap only if it is strictly greater than the root, so NaN
   never enters; among scores tied at the k-th, the heap keeps some (which ones
   is left to the heap's order, as torch.topk leaves it).
   The GIL is released while the rows are walked: spans of one search run this
   on several threads at once, each on heaps of its own. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#define CHUNK 32                                   /* scores compared per step: 8 vectors of 4 */
typedef float vf __attribute__((vector_size(16)));  /* GCC/Clang vectors: SSE2/NEON or plain code */
typedef int32_t vi __attribute__((vector_size(16)));

static void sift_down(float *v, int64_t *c, Py_ssize_t keep, float s, int64_t col)
{
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t l = 2 * i + 1, r = l + 1, m = i;
        float mv = s;
        if (l < keep && v[l] < mv) { m = l; mv = v[l]; }
        if (r < keep && v[r] < mv) { m = r; mv = v[r]; }
        if (m == i)
            break;
        v[i] = v[m];
        c[i] = c[m];
        i = m;
    }
    v[i] = s;
    c[i] = col;
}

static void push_rows(const float *scores, Py_ssize_t rows, Py_ssize_t b, int64_t first,
                      const int64_t *limits, float *values, int64_t *columns, Py_ssize_t keep)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *s = scores + r * b;
        float *v = values + r * keep;
        int64_t *c = columns + r * keep;
        float t = v[0];
        Py_ssize_t n = b;
        if (limits) {
            int64_t left = limits[r] - first;
            n = left < 0 ? 0 : (left < b ? (Py_ssize_t)left : b);
        }
        Py_ssize_t j = 0;
        vf tv = {t, t, t, t};
        for (; j + CHUNK <= n; j += CHUNK) {
            vf x[CHUNK / 4];
            memcpy(x, s + j, sizeof x);
            vi any = (x[0] > tv) | (x[1] > tv) | (x[2] > tv) | (x[3] > tv) |
                     (x[4] > tv) | (x[5] > tv) | (x[6] > tv) | (x[7] > tv);
            if (!(any[0] | any[1] | any[2] | any[3]))
                continue;
            for (int i = 0; i < CHUNK; i++) {
                if (s[j + i] > t) {
                    sift_down(v, c, keep, s[j + i], first + j + i);
                    t = v[0];
                }
            }
            tv = (vf){t, t, t, t};
        }
        for (; j < n; j++) {
            if (s[j] > t) {
                sift_down(v, c, keep, s[j], first + j);
                t = v[0];
            }
        }
    }
}

static int is_int64(const Py_buffer *view)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '=' || *f == '<' || *f == '@')
        f++;
    return view->itemsize == 8 && (strcmp(f, "l") == 0 || strcmp(f, "q") == 0);
}

static int is_float32(const Py_buffer *view)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '=' || *f == '<' || *f == '@')
        f++;
    return view->itemsize == 4 && strcmp(f, "f") == 0;
}

static PyObject *push(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *scores_obj, *limits_obj, *values_obj, *columns_obj;
    long long first;
    if (!PyArg_ParseTuple(args, "OLOOO:push", &scores_obj, &first, &limits_obj, &values_obj, &columns_obj))
        return NULL;
    Py_buffer scores = {0}, limits = {0}, values = {0}, columns = {0};
    int have_limits = limits_obj != Py_None;
    PyObject *result = NULL;
    const int ro = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT, rw = ro | PyBUF_WRITABLE;
    if (PyObject_GetBuffer(scores_obj, &scores, ro) < 0)
        goto done;
    if (PyObject_GetBuffer(values_obj, &values, rw) < 0)
        goto done;
    if (PyObject_GetBuffer(columns_obj, &columns, rw) < 0)
        goto done;
    if (have_limits && PyObject_GetBuffer(limits_obj, &limits, ro) < 0)
        goto done;
    if (scores.ndim != 2 || values.ndim != 2 || columns.ndim != 2 || (have_limits && limits.ndim != 1)) {
        PyErr_SetString(PyExc_ValueError, "push: scores, values and columns must be 2-D, limits 1-D");
        goto done;
    }
    if (!is_float32(&scores) || !is_float32(&values) || !is_int64(&columns) || (have_limits && !is_int64(&limits))) {
        PyErr_SetString(PyExc_TypeError, "push: scores and values must be float32, columns and limits int64");
        goto done;
    }
    Py_ssize_t rows = scores.shape[0], b = scores.shape[1], keep = values.shape[1];
    if (values.shape[0] != rows || columns.shape[0] != rows || columns.shape[1] != keep ||
        (have_limits && limits.shape[0] != rows) || keep < 1) {
        PyErr_SetString(PyExc_ValueError, "push: scores, values, columns and limits disagree on their rows, "
                                          "or values and columns on keep (at least 1)");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    push_rows((const float *)scores.buf, rows, b, (int64_t)first, have_limits ? (const int64_t *)limits.buf : NULL,
              (float *)values.buf, (int64_t *)columns.buf, keep);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    if (scores.obj) PyBuffer_Release(&scores);
    if (values.obj) PyBuffer_Release(&values);
    if (columns.obj) PyBuffer_Release(&columns);
    if (limits.obj) PyBuffer_Release(&limits);
    return result;
}

/* ---------------------------------------------------------------- gather

   gather(table, kind, rows, slots, queries, metric, keys, scores)
     table    (N, d) stored keys, C-contiguous; kind 0 float32, 1 float16, 2 bfloat16 (any 2- or
              4-byte buffer: bfloat16 arrives as int16)
     rows     (n, c) int64: the table row of each candidate
     slots    (n, c) int64: the candidate's slot, -1 where there is none
     queries  (n, d) float32
     metric   0 ip, 1 l2, 2 cos
     keys     (n, c, d) of the table's kind, written: the candidate's key, zeros where none; or None
              (scores only)
     scores   (n, c) float32, written: the exact score (-inf where none), as kvmem.topk.exact_scores
              defines it: ip q.k, l2 -|q - k|^2, cos q.k / (|q| |k|) (0 where a norm is 0). Products
              are summed in eight float32 lanes and the lanes in float64: the error of a float32
              matrix-vector product (d u |q| |k| at most), which the exact search's certificate allows. */

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {                                    /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);    /* inf, nan */
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float bf16_to_float(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static double lanes(vf a, vf b)
{
    vf t = a + b;
    return ((double)t[0] + (double)t[1]) + ((double)t[2] + (double)t[3]);
}

static float score_of(const float *q, const float *k, Py_ssize_t d, int metric)
{
    vf z = {0, 0, 0, 0}, a0 = z, a1 = z, q0 = z, q1 = z, k0 = z, k1 = z;   /* eight float32 lanes each */
    Py_ssize_t i = 0;
    for (; i + 8 <= d; i += 8) {
        vf x0, x1, y0, y1;
        memcpy(&x0, q + i, sizeof x0);
        memcpy(&x1, q + i + 4, sizeof x1);
        memcpy(&y0, k + i, sizeof y0);
        memcpy(&y1, k + i + 4, sizeof y1);
        if (metric == 1) {
            vf t0 = x0 - y0, t1 = x1 - y1;
            a0 += t0 * t0;
            a1 += t1 * t1;
        } else {
            a0 += x0 * y0;
            a1 += x1 * y1;
            if (metric == 2) {
                q0 += x0 * x0;
                q1 += x1 * x1;
                k0 += y0 * y0;
                k1 += y1 * y1;
            }
        }
    }
    double sa = lanes(a0, a1), sq = lanes(q0, q1), sk = lanes(k0, k1);
    for (; i < d; i++) {
        double x = q[i], y = k[i];
        if (metric == 1) {
            sa += (x - y) * (x - y);
        } else {
            sa += x * y;
            sq += x * x;
            sk += y * y;
        }
    }
    if (metric == 1)
        return (float)-sa;
    if (metric == 2)
        return (sq > 0.0 && sk > 0.0) ? (float)(sa / (sqrt(sq) * sqrt(sk))) : 0.0f;
    return (float)sa;
}

static void gather_rows(const char *table, int kind, Py_ssize_t item, Py_ssize_t d, const int64_t *rows,
                        const int64_t *slots, Py_ssize_t n, Py_ssize_t c, const float *queries, int metric,
                        char *keys, float *scores, float *wide)
{
    const size_t row_bytes = (size_t)(d * item);
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *q = queries + i * d;
        for (Py_ssize_t j = 0; j < c; j++) {
            Py_ssize_t at = i * c + j;
            char *out = keys ? keys + (size_t)at * row_bytes : NULL;
            if (slots[at] < 0) {
                if (out)
                    memset(out, 0, row_bytes);
                scores[at] = -INFINITY;
                continue;
            }
            const char *src = table + (size_t)rows[at] * row_bytes;
            if (at + 4 < n * c && slots[at + 4] >= 0) {    /* rows are scattered: ask for one 4 ahead */
                const char *next = table + (size_t)rows[at + 4] * row_bytes;
                for (size_t line = 0; line < row_bytes; line += 64)
                    __builtin_prefetch(next + line);
            }
            if (out)
                memcpy(out, src, row_bytes);
            const float *k = (const float *)src;
            if (kind != 0) {
                const uint16_t *h = (const uint16_t *)src;
                for (Py_ssize_t e = 0; e < d; e++)
                    wide[e] = kind == 1 ? half_to_float(h[e]) : bf16_to_float(h[e]);
                k = wide;
            }
            scores[at] = score_of(q, k, d, metric);
        }
    }
}

static PyObject *gather(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *table_obj, *rows_obj, *slots_obj, *queries_obj, *keys_obj, *scores_obj;
    int kind, metric;
    if (!PyArg_ParseTuple(args, "OiOOOiOO:gather", &table_obj, &kind, &rows_obj, &slots_obj, &queries_obj,
                          &metric, &keys_obj, &scores_obj))
        return NULL;
    Py_buffer table = {0}, rows = {0}, slots = {0}, queries = {0}, keys = {0}, scores = {0};
    PyObject *result = NULL;
    float *wide = NULL;
    const int ro = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT, rw = ro | PyBUF_WRITABLE;
    if (PyObject_GetBuffer(table_obj, &table, ro) < 0 || PyObject_GetBuffer(rows_obj, &rows, ro) < 0 ||
        PyObject_GetBuffer(slots_obj, &slots, ro) < 0 || PyObject_GetBuffer(queries_obj, &queries, ro) < 0 ||
        (keys_obj != Py_None && PyObject_GetBuffer(keys_obj, &keys, rw) < 0) ||
        PyObject_GetBuffer(scores_obj, &scores, rw) < 0)
        goto done;
    int have_keys = keys_obj != Py_None;
    if (kind < 0 || kind > 2 || metric < 0 || metric > 2) {
        PyErr_SetString(PyExc_ValueError, "gather: kind must be 0, 1 or 2 and metric 0 (ip), 1 (l2) or 2 (cos)");
        goto done;
    }
    Py_ssize_t item = kind == 0 ? 4 : 2;
    if (table.ndim != 2 || rows.ndim != 2 || slots.ndim != 2 || queries.ndim != 2 || (have_keys && keys.ndim != 3) ||
        scores.ndim != 2) {
        PyErr_SetString(PyExc_ValueError, "gather: table, rows, slots, queries and scores must be 2-D, keys 3-D");
        goto done;
    }
    if (table.itemsize != item || (have_keys && keys.itemsize != item) || !is_int64(&rows) || !is_int64(&slots) ||
        !is_float32(&queries) || !is_float32(&scores)) {
        PyErr_SetString(PyExc_TypeError, "gather: table and keys must have the kind's item size, rows and slots "
                                         "int64, queries and scores float32");
        goto done;
    }
    Py_ssize_t N = table.shape[0], d = table.shape[1], n = rows.shape[0], c = rows.shape[1];
    if (slots.shape[0] != n || slots.shape[1] != c || queries.shape[0] != n || queries.shape[1] != d ||
        (have_keys && (keys.shape[0] != n || keys.shape[1] != c || keys.shape[2] != d)) || scores.shape[0] != n ||
        scores.shape[1] != c) {
        PyErr_SetString(PyExc_ValueError, "gather: rows, slots, queries, keys and scores disagree on their shapes");
        goto done;
    }
    const int64_t *r = (const int64_t *)rows.buf, *sl = (const int64_t *)slots.buf;
    for (Py_ssize_t at = 0; at < n * c; at++) {
        if (sl[at] >= 0 && (r[at] < 0 || r[at] >= N)) {
            PyErr_SetString(PyExc_IndexError, "gather: a row is outside the table");
            goto done;
        }
    }
    wide = PyMem_Malloc((size_t)(d > 0 ? d : 1) * sizeof(float));
    if (wide == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    gather_rows((const char *)table.buf, kind, item, d, r, sl, n, c, (const float *)queries.buf, metric,
                have_keys ? (char *)keys.buf : NULL, (float *)scores.buf, wide);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(wide);
    if (table.obj) PyBuffer_Release(&table);
    if (rows.obj) PyBuffer_Release(&rows);
    if (slots.obj) PyBuffer_Release(&slots);
    if (queries.obj) PyBuffer_Release(&queries);
    if (keys.obj) PyBuffer_Release(&keys);
    if (scores.obj) PyBuffer_Release(&scores);
    return result;
}

static PyMethodDef methods[] = {
    {"push", push, METH_VARARGS, "push(scores, first, limits, values, columns): fold a block into per-row heaps."},
    {"gather", gather, METH_VARARGS,
     "gather(table, kind, rows, slots, queries, metric, keys, scores): candidates' keys and exact scores."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "The compiled kernels of kvmem: the fused top-k selection of exact CPU search, the gather-and-score of returned rows.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
