/* mtckpt._native: the Python face of the C fast path.
 *
 * Every function takes objects with the buffer protocol, checks its arguments while
 * holding the GIL, then releases it around the work (unless the input is too small for
 * that to pay). Its pure-Python twin, mtckpt/_fallback.py, raises the same errors with
 * the same messages: change both together. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>

#include "copy.h"
#include "crc32c.h"
#include "fileio.h"
#include "gf256.h"

/* Below this many bytes (microseconds of work) the GIL is kept: giving it up would let
 * another thread in, and retaking it can then wait far longer than the work took. */
#define GIL_RELEASE_MIN_BYTES ((Py_ssize_t)64 << 10)

typedef uint32_t (*crc_fn)(uint32_t crc, const void *data, size_t len);

static PyThreadState *release_gil_if_large(Py_ssize_t nbytes)
{
    return nbytes >= GIL_RELEASE_MIN_BYTES ? PyEval_SaveThread() : NULL;
}

static void reacquire_gil(PyThreadState *state)
{
    if (state)
        PyEval_RestoreThread(state);
}

static int check_nargs(const char *func, Py_ssize_t nargs, Py_ssize_t min, Py_ssize_t max)
{
    if (nargs >= min && nargs <= max)
        return 0;
    if (min == max)
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     func, min, nargs);
    else
        PyErr_Format(PyExc_TypeError,
                     "%s() takes from %zd to %zd positional arguments but %zd were given", func,
                     min, max, nargs);
    return -1;
}

/* A C-contiguous byte view of obj, writable if asked. Exporters refuse a strided or
 * read-only view with different exceptions (numpy raises ValueError, bytes BufferError):
 * all become one BufferError naming the argument, with the exporter's error as its
 * cause. An object with no buffer interface keeps its TypeError. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *func,
                      const char *arg)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) == 0)
        return 0;
    view->obj = NULL; /* so that a cleanup path's PyBuffer_Release is a no-op */
    if (PyErr_ExceptionMatches(PyExc_TypeError))
        return -1;

    PyObject *type, *cause, *traceback;
    PyErr_Fetch(&type, &cause, &traceback);
    PyErr_NormalizeException(&type, &cause, &traceback);
    if (traceback)
        PyException_SetTraceback(cause, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);

    PyErr_Format(PyExc_BufferError, "%s(): %s must be a %sC-contiguous buffer", func, arg,
                 writable ? "writable " : "");
    PyObject *error;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    PyException_SetCause(error, cause); /* steals cause */
    PyErr_Restore(type, error, traceback);
    return -1;
}

/* An integer (anything with __index__) in [0, max]. */
static int parse_uint(PyObject *obj, const char *func, const char *arg, uint64_t max,
                      uint64_t *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (!index)
        return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            Py_DECREF(index);
            return -1;
        }
        PyErr_Clear(); /* negative or wider than 64 bits */
    } else if (value <= max) {
        Py_DECREF(index);
        *out = value;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s(): %s must be between 0 and %llu, got %R", func, arg,
                 (unsigned long long)max, index);
    Py_DECREF(index);
    return -1;
}

static int parse_crc(PyObject *obj, const char *func, const char *arg, uint32_t *out)
{
    uint64_t value;
    if (parse_uint(obj, func, arg, UINT32_MAX, &value) < 0)
        return -1;
    *out = (uint32_t)value;
    return 0;
}

/* A count that must be at least 1 (threads, chunk_size). */
static int parse_count(PyObject *obj, const char *func, const char *arg, Py_ssize_t *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (!index)
        return -1;
    Py_ssize_t value = PyLong_AsSsize_t(index);
    if (value == -1 && PyErr_Occurred()) {
        Py_DECREF(index);
        return -1;
    }
    if (value < 1) {
        PyErr_Format(PyExc_ValueError, "%s(): %s must be >= 1, got %R", func, arg, index);
        Py_DECREF(index);
        return -1;
    }
    Py_DECREF(index);
    *out = value;
    return 0;
}

/* The optional trailing threads argument, clamped to MTCKPT_MAX_THREADS. */
static int parse_threads(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t position,
                         const char *func, int *out)
{
    Py_ssize_t threads = 1;
    if (nargs > position && parse_count(args[position], func, "threads", &threads) < 0)
        return -1;
    *out = threads > MTCKPT_MAX_THREADS ? MTCKPT_MAX_THREADS : (int)threads;
    return 0;
}

static int parse_fd(PyObject *obj, const char *func, int *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (!index)
        return -1;
    long value = PyLong_AsLong(index);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (value < INT_MIN || value > INT_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s(): fd is out of range", func);
        return -1;
    }
    *out = (int)value;
    return 0;
}

/* A file offset or length; negative values go to the system call, which says EINVAL. */
static int parse_offset(PyObject *obj, int64_t *out)
{
    PyObject *index = PyNumber_Index(obj);
    if (!index)
        return -1;
    long long value = PyLong_AsLongLong(index);
    Py_DECREF(index);
    if (value == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)value;
    return 0;
}

static PyObject *raise_errno(int error)
{
    errno = error;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* crc32c(data, value=0, /) and its two fixed-path variants. */
static PyObject *checksum(PyObject *const *args, Py_ssize_t nargs, const char *func, crc_fn fn)
{
    if (check_nargs(func, nargs, 1, 2) < 0)
        return NULL;
    Py_buffer data;
    if (get_buffer(args[0], &data, 0, func, "data") < 0)
        return NULL;
    uint32_t crc = 0;
    if (nargs > 1 && parse_crc(args[1], func, "value", &crc) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyThreadState *state = release_gil_if_large(data.len);
    crc = fn(crc, data.buf, (size_t)data.len);
    reacquire_gil(state);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *native_crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return checksum(args, nargs, "crc32c", crc32c_update);
}

static PyObject *native_crc32c_sw(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return checksum(args, nargs, "crc32c_sw", crc32c_update_sw);
}

static PyObject *native_crc32c_hw(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (!crc32c_hw_available()) {
        PyErr_SetString(PyExc_RuntimeError, "crc32c_hw(): this CPU has no CRC-32C instruction");
        return NULL;
    }
    return checksum(args, nargs, "crc32c_hw", crc32c_update_hw);
}

static PyObject *native_crc32c_combine(PyObject *module, PyObject *const *args,
                                       Py_ssize_t nargs)
{
    (void)module;
    uint32_t crc1, crc2;
    uint64_t len2;
    if (check_nargs("crc32c_combine", nargs, 3, 3) < 0 ||
        parse_crc(args[0], "crc32c_combine", "crc1", &crc1) < 0 ||
        parse_crc(args[1], "crc32c_combine", "crc2", &crc2) < 0 ||
        parse_uint(args[2], "crc32c_combine", "len2", UINT64_MAX, &len2) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(crc32c_combine(crc1, crc2, len2));
}

static PyObject *native_crc32c_chunks(PyObject *module, PyObject *const *args,
                                      Py_ssize_t nargs)
{
    (void)module;
    const char *func = "crc32c_chunks";
    if (check_nargs(func, nargs, 2, 3) < 0)
        return NULL;
    Py_buffer data;
    if (get_buffer(args[0], &data, 0, func, "data") < 0)
        return NULL;
    PyObject *result = NULL;
    uint32_t *crcs = NULL;
    Py_ssize_t chunk_size;
    int threads;
    if (parse_count(args[1], func, "chunk_size", &chunk_size) < 0 ||
        parse_threads(args, nargs, 2, func, &threads) < 0)
        goto done;

    Py_ssize_t nchunks = data.len / chunk_size + (data.len % chunk_size != 0);
    crcs = PyMem_Malloc(nchunks ? (size_t)nchunks * sizeof *crcs : 1);
    if (!crcs) {
        PyErr_NoMemory();
        goto done;
    }
    if (nchunks) {
        PyThreadState *state = release_gil_if_large(data.len);
        crc32c_chunks(data.buf, (size_t)data.len, (size_t)chunk_size, crcs, threads);
        reacquire_gil(state);
    }
    result = PyList_New(nchunks);
    for (Py_ssize_t i = 0; result && i < nchunks; i++) {
        PyObject *crc = PyLong_FromUnsignedLong(crcs[i]);
        if (!crc)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, crc);
    }
done:
    PyMem_Free(crcs);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *native_equal_chunks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    const char *func = "equal_chunks";
    if (check_nargs(func, nargs, 3, 4) < 0)
        return NULL;
    Py_buffer a, b;
    if (get_buffer(args[0], &a, 0, func, "a") < 0)
        return NULL;
    if (get_buffer(args[1], &b, 0, func, "b") < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t chunk_size;
    int threads;
    if (parse_count(args[2], func, "chunk_size", &chunk_size) < 0 ||
        parse_threads(args, nargs, 3, func, &threads) < 0)
        goto done;
    Py_ssize_t nchunks = a.len / chunk_size + (a.len % chunk_size != 0);
    result = PyBytes_FromStringAndSize(NULL, nchunks);
    if (result && nchunks) {
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
        PyThreadState *state = release_gil_if_large(a.len);
        equal_chunks(a.buf, (size_t)a.len, b.buf, (size_t)b.len, (size_t)chunk_size, out,
                     threads);
        reacquire_gil(state);
    }
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

/* dst (writable) and src of one length: the first two arguments of copy(),
   copy_crc32c() and gf256_muladd(). The caller releases both views either way. */
static int get_dst_src(PyObject *const *args, const char *func, Py_buffer *dst, Py_buffer *src)
{
    if (get_buffer(args[0], dst, 1, func, "dst") < 0 ||
        get_buffer(args[1], src, 0, func, "src") < 0)
        return -1;
    if (dst->len != src->len) {
        PyErr_Format(PyExc_ValueError, "%s(): dst has %zd bytes but src has %zd bytes", func,
                     dst->len, src->len);
        return -1;
    }
    return 0;
}

static PyObject *native_copy(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (check_nargs("copy", nargs, 2, 3) < 0)
        return NULL;
    Py_buffer dst = {0}, src = {0};
    PyObject *result = NULL;
    int threads;
    if (get_dst_src(args, "copy", &dst, &src) < 0 ||
        parse_threads(args, nargs, 2, "copy", &threads) < 0)
        goto done;
    struct copy_pair pair = {dst.buf, src.buf, (size_t)src.len};
    PyThreadState *state = release_gil_if_large(src.len);
    copy_pairs(&pair, 1, threads);
    reacquire_gil(state);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src); /* a no-op on a view never filled */
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *native_copy_many(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (check_nargs("copy_many", nargs, 2, 3) < 0)
        return NULL;
    PyObject *result = NULL, *dsts = NULL, *srcs = NULL;
    Py_buffer *views = NULL; /* dst and src views, interleaved, zeroed until filled */
    struct copy_pair *pairs = NULL;
    Py_ssize_t npairs = 0;
    int threads;

    dsts = PySequence_Fast(args[0], "copy_many(): dsts must be a sequence");
    if (!dsts)
        goto done;
    srcs = PySequence_Fast(args[1], "copy_many(): srcs must be a sequence");
    if (!srcs || parse_threads(args, nargs, 2, "copy_many", &threads) < 0)
        goto done;
    npairs = PySequence_Fast_GET_SIZE(dsts);
    if (npairs != PySequence_Fast_GET_SIZE(srcs)) {
        PyErr_Format(PyExc_ValueError, "copy_many(): %zd destinations but %zd sources", npairs,
                     PySequence_Fast_GET_SIZE(srcs));
        npairs = 0;
        goto done;
    }
    views = PyMem_Calloc((size_t)npairs * 2 + 1, sizeof *views);
    pairs = PyMem_Malloc(((size_t)npairs + 1) * sizeof *pairs);
    if (!views || !pairs) {
        PyErr_NoMemory();
        goto done;
    }

    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < npairs; i++) {
        Py_buffer *dst = &views[2 * i], *src = &views[2 * i + 1];
        char dst_name[40], src_name[40];
        snprintf(dst_name, sizeof dst_name, "dsts[%zd]", i);
        snprintf(src_name, sizeof src_name, "srcs[%zd]", i);
        if (get_buffer(PySequence_Fast_GET_ITEM(dsts, i), dst, 1, "copy_many", dst_name) < 0 ||
            get_buffer(PySequence_Fast_GET_ITEM(srcs, i), src, 0, "copy_many", src_name) < 0)
            goto done;
        if (dst->len != src->len) {
            PyErr_Format(PyExc_ValueError,
                         "copy_many(): dsts[%zd] has %zd bytes but srcs[%zd] has %zd bytes", i,
                         dst->len, i, src->len);
            goto done;
        }
        pairs[i] = (struct copy_pair){dst->buf, src->buf, (size_t)src->len};
        total += src->len;
    }
    PyThreadState *state = release_gil_if_large(total);
    copy_pairs(pairs, (size_t)npairs, threads);
    reacquire_gil(state);
    result = Py_NewRef(Py_None);
done:
    if (views)
        for (Py_ssize_t i = 0; i < 2 * npairs; i++)
            PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(pairs);
    Py_XDECREF(dsts);
    Py_XDECREF(srcs);
    return result;
}

static PyObject *native_copy_crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (check_nargs("copy_crc32c", nargs, 2, 3) < 0)
        return NULL;
    Py_buffer dst = {0}, src = {0};
    PyObject *result = NULL;
    uint32_t crc = 0;
    if (get_dst_src(args, "copy_crc32c", &dst, &src) < 0 ||
        (nargs > 2 && parse_crc(args[2], "copy_crc32c", "value", &crc) < 0))
        goto done;
    PyThreadState *state = release_gil_if_large(src.len);
    crc = copy_crc32c(dst.buf, src.buf, (size_t)src.len, crc);
    reacquire_gil(state);
    result = PyLong_FromUnsignedLong(crc);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *native_gf256_muladd(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (check_nargs("gf256_muladd", nargs, 3, 3) < 0)
        return NULL;
    Py_buffer dst = {0}, src = {0};
    PyObject *result = NULL;
    uint64_t coef;
    if (get_dst_src(args, "gf256_muladd", &dst, &src) < 0 ||
        parse_uint(args[2], "gf256_muladd", "coef", 255, &coef) < 0)
        goto done;
    PyThreadState *state = release_gil_if_large(src.len);
    gf256_muladd(dst.buf, src.buf, (size_t)src.len, (uint8_t)coef);
    reacquire_gil(state);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *native_prefault(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer buf;
    if (check_nargs("prefault", nargs, 1, 1) < 0 ||
        get_buffer(args[0], &buf, 1, "prefault", "buf") < 0)
        return NULL;
    PyThreadState *state = release_gil_if_large(buf.len);
    int error = prefault_pages(buf.buf, (size_t)buf.len);
    reacquire_gil(state);
    PyBuffer_Release(&buf);
    return error ? raise_errno(error) : Py_NewRef(Py_None);
}

static PyObject *native_fallocate(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int fd;
    int64_t offset, length;
    if (check_nargs("fallocate", nargs, 3, 3) < 0 || parse_fd(args[0], "fallocate", &fd) < 0 ||
        parse_offset(args[1], &offset) < 0 || parse_offset(args[2], &length) < 0)
        return NULL;
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = fallocate_range(fd, offset, length);
    Py_END_ALLOW_THREADS
    return error ? raise_errno(error) : Py_NewRef(Py_None);
}

static PyObject *native_pwrite_all(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int fd;
    int64_t offset;
    Py_buffer data;
    if (check_nargs("pwrite_all", nargs, 3, 3) < 0 || parse_fd(args[0], "pwrite_all", &fd) < 0 ||
        parse_offset(args[2], &offset) < 0 ||
        get_buffer(args[1], &data, 0, "pwrite_all", "data") < 0)
        return NULL;
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = pwrite_all(fd, data.buf, (size_t)data.len, offset);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return error ? raise_errno(error) : Py_NewRef(Py_None);
}

static PyObject *native_pread_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    int fd;
    int64_t offset;
    Py_buffer buf;
    if (check_nargs("pread_into", nargs, 3, 3) < 0 || parse_fd(args[0], "pread_into", &fd) < 0 ||
        parse_offset(args[2], &offset) < 0 ||
        get_buffer(args[1], &buf, 1, "pread_into", "buf") < 0)
        return NULL;
    int error;
    size_t nread;
    Py_BEGIN_ALLOW_THREADS
    error = pread_full(fd, buf.buf, (size_t)buf.len, offset, &nread);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return error ? raise_errno(error) : PyLong_FromSize_t(nread);
}

#define FASTCALL(name, func) {name, (PyCFunction)(void (*)(void))func, METH_FASTCALL, func##_doc}

PyDoc_STRVAR(native_crc32c_doc,
             "crc32c($module, data, value=0, /)\n--\n\n"
             "CRC-32C of data, continuing from value (a previous crc), with the fastest path\n"
             "this CPU has (see `hardware`).");
PyDoc_STRVAR(native_crc32c_sw_doc, "crc32c_sw($module, data, value=0, /)\n--\n\n"
                                   "CRC-32C with the portable software path.");
PyDoc_STRVAR(native_crc32c_hw_doc,
             "crc32c_hw($module, data, value=0, /)\n--\n\n"
             "CRC-32C with the CPU's instruction; RuntimeError where it has none.");
PyDoc_STRVAR(native_crc32c_combine_doc,
             "crc32c_combine($module, crc1, crc2, len2, /)\n--\n\n"
             "CRC-32C of A followed by B, from crc32c(A), crc32c(B) and len(B).");
PyDoc_STRVAR(native_crc32c_chunks_doc,
             "crc32c_chunks($module, data, chunk_size, threads=1, /)\n--\n\n"
             "CRC-32C of each consecutive chunk_size piece of data (the last may be\n"
             "shorter), computed by up to `threads` threads.");
PyDoc_STRVAR(native_equal_chunks_doc,
             "equal_chunks($module, a, b, chunk_size, threads=1, /)\n--\n\n"
             "bytes with 1 for each chunk_size piece of a (the last may be shorter) that\n"
             "equals the piece of b at the same offset, in bytes and length, else 0.");
PyDoc_STRVAR(native_copy_doc,
             "copy($module, dst, src, threads=1, /)\n--\n\n"
             "Copy src into dst (same size), split across up to `threads` threads when large.");
PyDoc_STRVAR(native_copy_many_doc,
             "copy_many($module, dsts, srcs, threads=1, /)\n--\n\n"
             "Copy srcs[i] into dsts[i] for every i; the total bytes are divided evenly\n"
             "across up to `threads` threads.");
PyDoc_STRVAR(native_copy_crc32c_doc,
             "copy_crc32c($module, dst, src, value=0, /)\n--\n\n"
             "Copy src into dst and return the CRC-32C of src continuing from value, in one\n"
             "pass.");
PyDoc_STRVAR(native_gf256_muladd_doc,
             "gf256_muladd($module, dst, src, coef, /)\n--\n\n"
             "dst ^= coef * src, byte by byte in GF(2^8) (polynomial 0x11d): a parity update.");
PyDoc_STRVAR(native_prefault_doc,
             "prefault($module, buf, /)\n--\n\n"
             "Make every page of the writable buffer resident and mapped; contents stay.");
PyDoc_STRVAR(native_fallocate_doc,
             "fallocate($module, fd, offset, length, /)\n--\n\n"
             "posix_fallocate(fd, offset, length); OSError on failure.");
PyDoc_STRVAR(native_pwrite_all_doc,
             "pwrite_all($module, fd, data, offset, /)\n--\n\n"
             "Write all of data at offset, retrying short writes; OSError on failure.");
PyDoc_STRVAR(native_pread_into_doc,
             "pread_into($module, fd, buf, offset, /)\n--\n\n"
             "Fill buf from offset; returns the bytes read, fewer only at end of file.");

static PyMethodDef native_methods[] = {
    FASTCALL("crc32c", native_crc32c),
    FASTCALL("crc32c_sw", native_crc32c_sw),
    FASTCALL("crc32c_hw", native_crc32c_hw),
    FASTCALL("crc32c_combine", native_crc32c_combine),
    FASTCALL("crc32c_chunks", native_crc32c_chunks),
    FASTCALL("equal_chunks", native_equal_chunks),
    FASTCALL("copy", native_copy),
    FASTCALL("copy_many", native_copy_many),
    FASTCALL("copy_crc32c", native_copy_crc32c),
    FASTCALL("gf256_muladd", native_gf256_muladd),
    FASTCALL("prefault", native_prefault),
    FASTCALL("fallocate", native_fallocate),
    FASTCALL("pwrite_all", native_pwrite_all),
    FASTCALL("pread_into", native_pread_into),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mtckpt._native",
    .m_doc = "mtckpt's native fast path: crc32c, multi-threaded copies, GF(2^8) parity, "
             "file I/O helpers.",
    .m_size = -1,
    .m_methods = native_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    crc32c_init();
    PyObject *module = PyModule_Create(&native_module);
    if (!module)
        return NULL;
    if (PyModule_AddStringConstant(module, "hardware", crc32c_hardware()) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
