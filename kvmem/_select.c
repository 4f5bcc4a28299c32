/* The running top-k of kvmem's exact CPU search, fused with its blocked scoring.

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

static PyMethodDef methods[] = {
    {"push", push, METH_VARARGS, "push(scores, first, limits, values, columns): fold a block into per-row heaps."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_select", "Fused top-k selection of exact CPU search.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__select(void)
{
    return PyModule_Create(&module);
}
