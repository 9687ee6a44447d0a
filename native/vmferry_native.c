// Small helpers Node's fs lacks: FIEMAP (or else SEEK_DATA/SEEK_HOLE) so raw files map their holes
// and unwritten (preallocated, reading as zeros) extents without reading them, hole punching for
// sparse raw output, read windows that map a file's pages instead of copying them, file-to-file
// copies on the thread pool so stored-as-is data goes from the source's page cache to the output's
// without passing through JS, preallocation of what is about to be written, zero tests that read a
// file instead of a mapping, the byte loops of the compress workers (Adler-32, the
// incompressibility test) and CRC-32C for VHDX.
#define _GNU_SOURCE
#include <linux/falloc.h>
#include <errno.h>
#include <stdio.h>
#include <fcntl.h>
#include <math.h>
#include <node_api.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

static napi_value throw_errno(napi_env env, const char *what) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
  napi_throw_error(env, NULL, msg);
  return NULL;
}

// seek(fd, offset, whence: 0 = data, 1 = hole) -> next offset, or -1 when there is none (ENXIO)
static napi_value seek_data_hole(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd, which;
  int64_t offset;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &which) != napi_ok) {
    napi_throw_type_error(env, NULL, "seek(fd, offset, which)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
  napi_value out;
  if (r < 0) {
    if (errno == ENXIO) {
      napi_create_int64(env, -1, &out);
      return out;
    }
    return throw_errno(env, "lseek");
  }
  napi_create_int64(env, (int64_t)r, &out);
  return out;
}

// Reads the (fd, a, b) arguments that allocation, punchHole and preallocate take; 0 when they are
// missing or not numbers (the caller throws its own usage line, after its own range checks).
static int fd_and_two_int64(napi_env env, napi_callback_info info, int32_t *fd, int64_t *a, int64_t *b) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  return argc >= 3 && napi_get_value_int32(env, argv[0], fd) == napi_ok && napi_get_value_int64(env, argv[1], a) == napi_ok &&
         napi_get_value_int64(env, argv[2], b) == napi_ok;
}

// allocation(fd, from, to) -> [start0, end0, written0, start1, end1, written1, ...]: the file's
// first allocated extents within [from, to), in order: one FIEMAP batch (at most 256), so memory
// stays bounded however fragmented the file; the caller asks again from the last end, and an
// empty answer means none is left. written is 1 for data, 0 for an unwritten extent (allocated,
// reading as zeros); the gaps between extents are holes. Null when the file system has no FIEMAP.
// FIEMAP_FLAG_SYNC writes dirty pages back first: data written into a preallocated extent stays
// flagged unwritten until then, and delayed allocations have no extent yet. SEEK_DATA cannot tell
// unwritten zeros apart (once read, their pages are cached and ext4 reports them as data), and
// walking a cached unwritten extent with SEEK_HOLE takes milliseconds: 2 ms of the os disk's 2.5 ms
// of seeks went on its 64 MiB journal, against 0.03 ms for this whole map.
#define FIEMAP_BATCH 256
static napi_value allocation_map(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t from, to;
  if (!fd_and_two_int64(env, info, &fd, &from, &to) || from < 0 || to < from) {
    napi_throw_type_error(env, NULL, "allocation(fd, from, to)");
    return NULL;
  }
  napi_value out, nothing;
  napi_get_null(env, &nothing);
  struct fiemap *fm = calloc(1, sizeof(struct fiemap) + FIEMAP_BATCH * sizeof(struct fiemap_extent));
  if (!fm) return nothing;
  napi_create_array(env, &out);
  uint32_t n = 0;
  uint64_t pos = (uint64_t)from;
  uint32_t flags = FIEMAP_FLAG_SYNC;
  // Extents whose bytes FIEMAP cannot vouch for are taken as data.
  const uint32_t unsure = FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED |
                          FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL;
  while (pos < (uint64_t)to) {
    memset(fm, 0, sizeof(struct fiemap));
    fm->fm_start = pos;
    fm->fm_length = (uint64_t)to - pos;
    fm->fm_flags = flags;
    fm->fm_extent_count = FIEMAP_BATCH;
    if (ioctl(fd, FS_IOC_FIEMAP, fm) < 0) {
      free(fm);
      return nothing;
    }
    flags = 0; // one write-back per call is enough
    if (fm->fm_mapped_extents == 0) break;
    const uint64_t asked = pos;
    int last = 0;
    for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
      struct fiemap_extent *e = &fm->fm_extents[i];
      uint64_t s = e->fe_logical, end = e->fe_logical + e->fe_length;
      uint64_t a = s < pos ? pos : s, b = end > (uint64_t)to ? (uint64_t)to : end;
      if (a < b) {
        int written = !(e->fe_flags & FIEMAP_EXTENT_UNWRITTEN) || (e->fe_flags & unsure);
        napi_value va, vb, vw;
        napi_create_double(env, (double)a, &va);
        napi_create_double(env, (double)b, &vb);
        napi_create_int32(env, written, &vw);
        napi_set_element(env, out, n++, va);
        napi_set_element(env, out, n++, vb);
        napi_set_element(env, out, n++, vw);
      }
      if (end > pos) pos = end;
      if (e->fe_flags & FIEMAP_EXTENT_LAST) last = 1;
    }
    // One batch that listed something is enough; a batch of extents wholly before `from` (which
    // FIEMAP may return) asks on from their end.
    if (n > 0 || last || pos == asked) break;
  }
  free(fm);
  return out;
}

// punchHole(fd, offset, length): deallocate a range, keeping the file size
static napi_value punch_hole(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t offset, length;
  if (!fd_and_two_int64(env, info, &fd, &offset, &length)) {
    napi_throw_type_error(env, NULL, "punchHole(fd, offset, length)");
    return NULL;
  }
  napi_value out;
  int ok = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0;
  napi_get_boolean(env, ok, &out);
  return out;
}

// Turns the whole file-system blocks of [offset, offset + length) into allocated, unwritten (reading
// as zero) extents before data is written over them, as qemu's qcow2 driver does for new clusters:
// ext4 then writes into allocated blocks instead of reserving delayed allocation page by page
// (dense 1 GiB raw -> qcow2: 0.58 s against 0.68 s). Only whole blocks: zeroing a partial one
// would first write back a neighbour's dirty page. Best effort; a refusal changes nothing.
static void preallocate(int fd, int64_t offset, int64_t length) {
  const int64_t block = 4096;
  int64_t start = (offset + block - 1) / block * block, end = (offset + length) / block * block;
  if (end - start >= 16 * block) fallocate(fd, FALLOC_FL_ZERO_RANGE, (off_t)start, (off_t)(end - start));
}

// preallocate(fd, offset, length): the same, for large writes from memory.
static napi_value preallocate_range(napi_env env, napi_callback_info info) {
  int32_t fd;
  int64_t offset, length;
  if (!fd_and_two_int64(env, info, &fd, &offset, &length) || offset < 0 || length < 0) {
    napi_throw_type_error(env, NULL, "preallocate(fd, offset, length)");
    return NULL;
  }
  preallocate(fd, offset, length);
  return NULL;
}

static void unmap_window(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

// mapWindow(length) -> Buffer: private anonymous memory, page aligned, that mapFile can later point
// at a file's pages. Freed (unmapped) by the garbage collector.
static napi_value map_window(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int64_t length;
  if (argc < 1 || napi_get_value_int64(env, argv[0], &length) != napi_ok || length <= 0) {
    napi_throw_type_error(env, NULL, "mapWindow(length)");
    return NULL;
  }
  void *p = mmap(NULL, (size_t)length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return throw_errno(env, "mmap");
  napi_value out;
  if (napi_create_external_buffer(env, (size_t)length, p, unmap_window, (void *)(uintptr_t)length, &out) != napi_ok) {
    munmap(p, (size_t)length);
    napi_throw_error(env, NULL, "external buffers are not allowed here");
    return NULL;
  }
  return out;
}

// Whether the file page mapped at `addr` is in the page cache (mincore; false if it cannot say).
static bool page_cached(uint8_t *addr, size_t page) {
  unsigned char resident = 0;
  return mincore(addr, page, &resident) == 0 && (resident & 1);
}

// mapFile(buffer, fd, offset, length) -> bool: replaces the pages under buffer[0, length) with a
// private (copy-on-write) mapping of the file at offset. The buffer and the offset must be page
// aligned and the range inside the file (pages past the end would fault). False when it cannot be
// done: the caller then reads the ordinary way.
static napi_value map_file(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  void *data;
  size_t size;
  int32_t fd;
  int64_t offset, length;
  napi_value out;
  if (argc < 4 || napi_get_buffer_info(env, argv[0], &data, &size) != napi_ok ||
      napi_get_value_int32(env, argv[1], &fd) != napi_ok || napi_get_value_int64(env, argv[2], &offset) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok) {
    napi_throw_type_error(env, NULL, "mapFile(buffer, fd, offset, length)");
    return NULL;
  }
  long page = sysconf(_SC_PAGESIZE);
  int ok = length > 0 && (size_t)length <= size && ((uintptr_t)data % (uintptr_t)page) == 0 && offset >= 0 &&
           offset % page == 0;
  if (ok) {
    size_t span = ((size_t)length + (size_t)page - 1) / (size_t)page * (size_t)page;
    // The window must cover whole pages of its own, or the mapping would spill past the buffer.
    ok = span <= size && mmap(data, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, (off_t)offset) != MAP_FAILED;
    // Pages not in the cache are read ahead now, in large requests, instead of a fault (or a zero
    // test's read) at a time. The hint walks every page even when all are cached (70 to 95 us per
    // 4 MiB: 6 ms of the main thread's time converting the os disk), so a range whose first and
    // last pages are cached is taken as cached.
    if (ok && !(page_cached((uint8_t *)data, (size_t)page) && page_cached((uint8_t *)data + span - page, (size_t)page)))
      madvise(data, span, MADV_WILLNEED);
  }
  napi_get_boolean(env, ok, &out);
  return out;
}

// The promise of an async job: `execute` runs on the libuv thread pool, `complete` back on the
// main thread, where it must call finish_job.
static napi_value queue_job(napi_env env, const char *name, napi_async_execute_callback execute,
                            napi_async_complete_callback complete, void *job, napi_deferred *deferred,
                            napi_async_work *work) {
  napi_value promise, resource;
  napi_create_promise(env, deferred, &promise);
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &resource);
  napi_create_async_work(env, NULL, resource, execute, complete, job, work);
  napi_queue_async_work(env, *work);
  return promise;
}

// Resolves a queued job's promise with `result` and releases its work item.
static void finish_job(napi_env env, napi_deferred deferred, napi_async_work work, napi_value result) {
  napi_resolve_deferred(env, deferred, result);
  napi_delete_async_work(env, work);
}

// Resolves a copy's or a write's promise with [bytes done, errno] (ECANCELED when it never ran).
static void finish_count_job(napi_env env, napi_status status, napi_deferred deferred, napi_async_work work,
                             int64_t done, int err) {
  napi_value result, count, code;
  napi_create_array_with_length(env, 2, &result);
  napi_create_int64(env, done, &count);
  napi_create_int32(env, status == napi_ok ? err : ECANCELED, &code);
  napi_set_element(env, result, 0, count);
  napi_set_element(env, result, 1, code);
  finish_job(env, deferred, work, result);
}

// copyRange(srcFd, srcPos, dstFd, dstPos, length, viaKernel) -> Promise<[copied, errno]>: copies
// on the libuv thread pool until `length` bytes are copied or the copy stops (errno, or 0 at the
// source's end); the caller writes whatever is left the ordinary way. viaKernel: copy_file_range
// (for the file systems offloadsCopies names); otherwise a read into a small buffer and a write.
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int src, dst;
  int64_t src_pos, dst_pos, length, copied;
  bool via_kernel;
  int err;
} copy_job;

// File systems whose copy_file_range does better than copy the bytes: it shares the blocks
// (reflink) or has the server copy. Elsewhere (ext4, tmpfs, overlayfs...) the kernel copies
// through a pipe of 64 KiB page lists, and copies running at once into one output spin on its
// lock; a read into a buffer that stays in the core's cache and a write from it was faster
// (replaying the os disk's 62 copies, 180 MiB: 52 to 70 ms against 72 to 90 ms; 1 GiB of dense
// data: 280 to 326 ms against 344 to 390 ms).
static bool offloads_copies(int fd) {
  struct statfs fs;
  if (fstatfs(fd, &fs) != 0) return false;
  switch ((unsigned long)fs.f_type) {
    case 0x9123683EUL: // btrfs
    case 0x58465342UL: // xfs
    case 0xCA451A4EUL: // bcachefs
    case 0x7461636FUL: // ocfs2
    case 0x2FC12FC1UL: // zfs
    case 0x6969UL:     // nfs
    case 0xFE534D42UL: // smb2
    case 0xFF534D42UL: // cifs
    case 0x00C36400UL: // ceph
      return true;
    default:
      return false;
  }
}

// offloadsCopies(fd) -> whether copyRange should use copy_file_range into this file.
static napi_value offloads_copies_js(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  int32_t fd;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "offloadsCopies(fd)");
    return NULL;
  }
  napi_get_boolean(env, offloads_copies(fd), &out);
  return out;
}

// Small enough to stay in a core's L2 cache from the read to the write (256 KiB measured a little
// faster than 512 KiB and 1 MiB on the replay above).
#define BOUNCE_SIZE (256 * 1024)
// One per pool thread, allocated by its first copy.
static __thread uint8_t *bounce;

static void copy_through_buffer(copy_job *job) {
  if (!bounce && posix_memalign((void **)&bounce, 4096, BOUNCE_SIZE) != 0) {
    bounce = NULL;
    job->err = ENOMEM;
    return;
  }
  while (job->copied < job->length) {
    int64_t want = job->length - job->copied;
    if (want > BOUNCE_SIZE) want = BOUNCE_SIZE;
    ssize_t got = pread(job->src, bounce, (size_t)want, job->src_pos + job->copied);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      job->err = got < 0 ? errno : 0;
      return;
    }
    for (ssize_t put = 0; put < got;) {
      ssize_t n = pwrite(job->dst, bounce + put, (size_t)(got - put), job->dst_pos + job->copied + put);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        // The caller rewrites from the first byte not known to be written.
        job->err = n < 0 ? errno : EIO;
        job->copied += put;
        return;
      }
      put += n;
    }
    job->copied += got;
  }
}

static void copy_in_kernel(copy_job *job) {
  loff_t in = job->src_pos, out = job->dst_pos;
  while (job->copied < job->length) {
    ssize_t n = copy_file_range(job->src, &in, job->dst, &out, (size_t)(job->length - job->copied), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      job->err = n < 0 ? errno : 0;
      return;
    }
    job->copied += n;
  }
}

static void copy_execute(napi_env env, void *data) {
  (void)env;
  copy_job *job = data;
  preallocate(job->dst, job->dst_pos, job->length);
  if (job->via_kernel)
    copy_in_kernel(job);
  else
    copy_through_buffer(job);
}

static void copy_complete(napi_env env, napi_status status, void *data) {
  copy_job *job = data;
  finish_count_job(env, status, job->deferred, job->work, job->copied, job->err);
  free(job);
}

static napi_value copy_range(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  copy_job *job = calloc(1, sizeof *job);
  if (!job) return throw_errno(env, "calloc");
  if (argc < 6 || napi_get_value_int32(env, argv[0], &job->src) != napi_ok ||
      napi_get_value_int64(env, argv[1], &job->src_pos) != napi_ok ||
      napi_get_value_int32(env, argv[2], &job->dst) != napi_ok ||
      napi_get_value_int64(env, argv[3], &job->dst_pos) != napi_ok ||
      napi_get_value_int64(env, argv[4], &job->length) != napi_ok ||
      napi_get_value_bool(env, argv[5], &job->via_kernel) != napi_ok || job->length < 0 || job->src_pos < 0 ||
      job->dst_pos < 0) {
    free(job);
    napi_throw_type_error(env, NULL, "copyRange(srcFd, srcPos, dstFd, dstPos, length, viaKernel)");
    return NULL;
  }
  return queue_job(env, "vmferry:copyRange", copy_execute, copy_complete, job, &job->deferred, &job->work);
}

// writeAt(fd, buffer, position, preallocate) -> Promise<[written, errno]>: writes the whole buffer
// on the libuv thread pool, at most WRITE_STEP bytes a call, until it is written or a write fails
// (errno; the caller writes the rest the ordinary way, which reports the error). A buffered write
// takes page-cache folios as large as itself, and large ones were slow to get on this project's
// VMs (likely because they hand free 2 MiB blocks back to the hypervisor): 1 GiB written
// 256 KiB at a time took 0.17 to 0.24 s, 1 MiB at a time 0.28 to 1.0 s, 2 MiB at a time 1.1 to
// 2.1 s. preallocate: allocate the blocks first (see preallocate), here rather than on the
// caller's thread.
#define WRITE_STEP (256 * 1024)
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref keep; // the buffer, alive until the job completes
  const uint8_t *data;
  int fd;
  int64_t length, position, written;
  bool preallocate;
  int err;
} write_job;

static void write_execute(napi_env env, void *data) {
  (void)env;
  write_job *job = data;
  if (job->preallocate) preallocate(job->fd, job->position, job->length);
  while (job->written < job->length) {
    int64_t want = job->length - job->written;
    if (want > WRITE_STEP) want = WRITE_STEP;
    ssize_t n = pwrite(job->fd, job->data + job->written, (size_t)want, job->position + job->written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      job->err = n < 0 ? errno : EIO;
      return;
    }
    job->written += n;
  }
}

static void write_complete(napi_env env, napi_status status, void *data) {
  write_job *job = data;
  napi_delete_reference(env, job->keep);
  finish_count_job(env, status, job->deferred, job->work, job->written, job->err);
  free(job);
}

static napi_value write_at(napi_env env, napi_callback_info info) {
  size_t argc = 4;
  napi_value argv[4];
  void *raw = NULL;
  size_t length = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  write_job *job = calloc(1, sizeof *job);
  if (!job) return throw_errno(env, "calloc");
  if (argc < 4 || napi_get_value_int32(env, argv[0], &job->fd) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &raw, &length) != napi_ok ||
      napi_get_value_int64(env, argv[2], &job->position) != napi_ok ||
      napi_get_value_bool(env, argv[3], &job->preallocate) != napi_ok || job->position < 0) {
    free(job);
    napi_throw_type_error(env, NULL, "writeAt(fd, buffer, position, preallocate)");
    return NULL;
  }
  job->data = raw;
  job->length = (int64_t)length;
  napi_create_reference(env, argv[1], 1, &job->keep);
  return queue_job(env, "vmferry:writeAt", write_execute, write_complete, job, &job->deferred, &job->work);
}

// The bytes of the one Buffer argument; false (a TypeError thrown) when there is none.
static int buffer_argument(napi_env env, napi_callback_info info, const char *usage, const uint8_t **data, size_t *n) {
  size_t argc = 1;
  napi_value argv[1];
  void *raw;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_buffer_info(env, argv[0], &raw, n) != napi_ok) {
    napi_throw_type_error(env, NULL, usage);
    return 0;
  }
  *data = raw;
  return 1;
}

// True when every byte of p[0, n) is zero; 64 bytes a step, so the compiler can vectorise it.
static int all_zero(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t w[8], acc = 0;
    memcpy(w, p + i, 64);
    for (int k = 0; k < 8; k++) acc |= w[k];
    if (acc) return 0;
  }
  for (; i < n; i++)
    if (p[i]) return 0;
  return 1;
}

// 1 when the file's bytes [position, position + length) are all zero, 0 when not, -1 when they
// cannot be read. `buf` holds ZERO_READ bytes. Data usually shows in its first bytes: a small read
// first, then large ones. (64 bytes first rather than a page: the os disk's 3,928 clusters took
// 4.5 to 6 ms of reads instead of 7 to 12 ms.)
#define ZERO_READ 65536
static int range_is_zero(int fd, int64_t position, int64_t length, uint8_t *buf) {
  int64_t step = 64;
  for (int64_t done = 0; done < length;) {
    size_t want = (size_t)(length - done < step ? length - done : step);
    ssize_t got = pread(fd, buf, want, (off_t)(position + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return -1;
    if (!all_zero(buf, (size_t)got)) return 0;
    done += got;
    step = ZERO_READ;
  }
  return 1;
}

// zeroAt(fd, position, length) -> range_is_zero, on the calling thread. Zero detection of mapped
// windows without touching them: a data cluster costs one 4 KiB read instead of a page fault that
// maps the whole cluster, and the window's later remapping then has nothing to unmap.
static napi_value zero_at(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  int32_t fd;
  int64_t position, length;
  if (argc < 3 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &position) != napi_ok || napi_get_value_int64(env, argv[2], &length) != napi_ok ||
      position < 0 || length < 0) {
    napi_throw_type_error(env, NULL, "zeroAt(fd, position, length)");
    return NULL;
  }
  static uint8_t buf[ZERO_READ] __attribute__((aligned(64)));
  napi_create_int32(env, range_is_zero(fd, position, length, buf), &out);
  return out;
}

// zeroMap(fd, position, length, first, unit) -> Promise<Buffer | null>: range_is_zero for each
// cluster of [position, position + length) on the libuv thread pool, one flag byte each (1 zero,
// 0 data); the first cluster is `first` bytes long, the others `unit` (the last may be shorter).
// Null when some bytes cannot be read. One call per read chunk keeps the zero test of a plain
// copy off the main thread, where it took 41 ms of the os disk's conversion to qcow2.
typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  int64_t position, length, first, unit, count;
  uint8_t *flags;
  int failed;
} zero_map_job;

static void zero_map_execute(napi_env env, void *data) {
  (void)env;
  zero_map_job *job = data;
  uint8_t *buf = malloc(ZERO_READ);
  if (!buf) {
    job->failed = 1;
    return;
  }
  int64_t start = 0;
  for (int64_t i = 0; i < job->count; i++) {
    int64_t len = i == 0 ? job->first : job->unit;
    if (len > job->length - start) len = job->length - start;
    int r = range_is_zero(job->fd, job->position + start, len, buf);
    if (r < 0) {
      job->failed = 1;
      break;
    }
    job->flags[i] = (uint8_t)r;
    start += len;
  }
  free(buf);
}

static void zero_map_complete(napi_env env, napi_status status, void *data) {
  zero_map_job *job = data;
  napi_value result;
  if (status != napi_ok || job->failed ||
      napi_create_buffer_copy(env, (size_t)job->count, job->flags, NULL, &result) != napi_ok) {
    napi_get_null(env, &result);
  }
  finish_job(env, job->deferred, job->work, result);
  free(job->flags);
  free(job);
}

static napi_value zero_map(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  zero_map_job *job = calloc(1, sizeof *job);
  if (!job) return throw_errno(env, "calloc");
  if (argc < 5 || napi_get_value_int32(env, argv[0], &job->fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &job->position) != napi_ok ||
      napi_get_value_int64(env, argv[2], &job->length) != napi_ok ||
      napi_get_value_int64(env, argv[3], &job->first) != napi_ok ||
      napi_get_value_int64(env, argv[4], &job->unit) != napi_ok || job->position < 0 || job->length <= 0 ||
      job->first <= 0 || job->unit <= 0) {
    free(job);
    napi_throw_type_error(env, NULL, "zeroMap(fd, position, length, first, unit)");
    return NULL;
  }
  job->count = job->first >= job->length ? 1 : 1 + (job->length - job->first + job->unit - 1) / job->unit;
  job->flags = malloc((size_t)job->count);
  if (!job->flags) {
    free(job);
    return throw_errno(env, "malloc");
  }
  return queue_job(env, "vmferry:zeroMap", zero_map_execute, zero_map_complete, job, &job->deferred, &job->work);
}

#define ADLER_MOD 65521
// Bytes after which the scalar sums must be reduced so they cannot overflow 32 bits.
#define ADLER_RUN 5552

// The scalar Adler-32 step over p[0, n), from sums a and b.
static uint32_t adler32_scalar(uint32_t a, uint32_t b, const uint8_t *p, size_t n) {
  while (n > 0) {
    size_t run = n < ADLER_RUN ? n : ADLER_RUN;
    n -= run;
    for (; run > 0; run--, p++) {
      a += *p;
      b += a;
    }
    a %= ADLER_MOD;
    b %= ADLER_MOD;
  }
  return (b << 16) | a;
}

#if defined(__SSE2__)
#include <emmintrin.h>
// 16 bytes a step: byte sums by SAD against zero, position-weighted sums (16 down to 1) by
// multiply-add of the bytes widened to 16 bits, and the running sum of earlier steps' byte sums,
// which stands for each earlier byte being counted again after every later step. Reduced every
// ADLER_RUN bytes, where no 32-bit lane can have overflowed.
static uint32_t adler32_bytes(const uint8_t *p, size_t n) {
  uint32_t a = 1, b = 0;
  const __m128i zero = _mm_setzero_si128();
  const __m128i weight_lo = _mm_setr_epi16(16, 15, 14, 13, 12, 11, 10, 9);
  const __m128i weight_hi = _mm_setr_epi16(8, 7, 6, 5, 4, 3, 2, 1);
  while (n >= 16) {
    size_t steps = n / 16 < ADLER_RUN / 16 ? n / 16 : ADLER_RUN / 16;
    __m128i sums = zero, earlier = zero, weighted = zero;
    for (size_t k = 0; k < steps; k++, p += 16) {
      __m128i x = _mm_loadu_si128((const __m128i *)p);
      earlier = _mm_add_epi32(earlier, sums);
      sums = _mm_add_epi32(sums, _mm_sad_epu8(x, zero));
      weighted = _mm_add_epi32(weighted, _mm_madd_epi16(_mm_unpacklo_epi8(x, zero), weight_lo));
      weighted = _mm_add_epi32(weighted, _mm_madd_epi16(_mm_unpackhi_epi8(x, zero), weight_hi));
    }
    uint32_t s[4], e[4], w[4];
    _mm_storeu_si128((__m128i *)s, sums);
    _mm_storeu_si128((__m128i *)e, earlier);
    _mm_storeu_si128((__m128i *)w, weighted);
    // SAD leaves its two sums in lanes 0 and 2.
    uint64_t len = steps * 16, byte_sum = (uint64_t)s[0] + s[2];
    uint64_t weighted_sum = 16 * ((uint64_t)e[0] + e[2]) + (uint64_t)w[0] + w[1] + w[2] + w[3];
    b = (uint32_t)((b + len * a + weighted_sum) % ADLER_MOD);
    a = (uint32_t)((a + byte_sum) % ADLER_MOD);
    n -= len;
  }
  return adler32_scalar(a, b, p, n);
}
#else
static uint32_t adler32_bytes(const uint8_t *p, size_t n) { return adler32_scalar(1, 0, p, n); }
#endif

// adler32(buffer) -> the Adler-32 (RFC 1950) of its bytes, for stored deflate streams: 9 to 15 GB/s
// per core here with SSE2 (the byte-at-a-time loop ran at 2.5 GB/s, zlib's own at 2.5 to 3).
static napi_value adler32_sum(napi_env env, napi_callback_info info) {
  const uint8_t *p;
  size_t n;
  if (!buffer_argument(env, info, "adler32(buffer)", &p, &n)) return NULL;
  napi_value out;
  napi_create_uint32(env, adler32_bytes(p, n), &out);
  return out;
}

// looksIncompressible(buffer) -> bool: the test of compress-worker.ts's function of that name, in C
// (64 KiB units: 3.6 GB/s per core here; the JS one ran at 0.7 to 1.0 GB/s, the pace of the stored
// path it decides on).
// The same samples, threshold and hash table, so the same decisions.
static napi_value looks_incompressible(napi_env env, napi_callback_info info) {
  const uint8_t *data;
  size_t n;
  if (!buffer_argument(env, info, "looksIncompressible(buffer)", &data, &n)) return NULL;
  napi_value out;
  int result = n >= 4096;
  if (result) {
    uint32_t histogram[256] = {0};
    uint32_t samples = 0;
    for (size_t i = 0; i < n; i += 4, samples++) histogram[data[i]]++;
    double bits = 0;
    for (int b = 0; b < 256; b++)
      if (histogram[b] > 0) bits -= histogram[b] * log2((double)histogram[b] / samples);
    result = bits / samples >= 7.95;
  }
  if (result) {
    int32_t seen_at[4096];
    memset(seen_at, 0xff, sizeof seen_at);
    for (size_t i = 0, count = 0; i + 4 <= n && count < 2048 && result; i += 61, count++) {
      uint32_t word;
      memcpy(&word, data + i, 4);
      uint32_t slot = (word * 0x9e3779b1u) >> 20;
      while (seen_at[slot] != -1) {
        uint32_t other;
        memcpy(&other, data + seen_at[slot], 4);
        if (other == word) {
          result = 0;
          break;
        }
        slot = (slot + 1) & 4095;
      }
      seen_at[slot] = (int32_t)i;
    }
  }
  napi_get_boolean(env, result, &out);
  return out;
}

// crc32c(bytes, crc) -> CRC-32C (Castagnoli) of the bytes, continuing `crc` (0 to start), as
// VHDX checksums use it. SSE4.2's crc32 instruction where the CPU has it (a vhdx's 64 KiB region
// tables and 1 MiB log were the largest single cost of opening or creating one in JS), a table
// otherwise.
#if defined(__x86_64__)
#include <nmmintrin.h>
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t c, const uint8_t *p, size_t n) {
  uint64_t c64 = c;
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c64 = _mm_crc32_u64(c64, v);
  }
  c = (uint32_t)c64;
  for (; n > 0; n--) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

static uint32_t crc32c_table[256];

static uint32_t crc32c_sw(uint32_t c, const uint8_t *p, size_t n) {
  if (crc32c_table[1] == 0) {
    for (uint32_t i = 0; i < 256; i++) {
      uint32_t v = i;
      for (int k = 0; k < 8; k++) v = v & 1 ? (v >> 1) ^ 0x82f63b78u : v >> 1;
      crc32c_table[i] = v;
    }
  }
  for (; n > 0; n--) c = crc32c_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

static napi_value crc32c_sum(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_typedarray_type type;
  size_t n;
  void *data;
  napi_value arraybuffer;
  size_t offset;
  uint32_t crc;
  if (argc < 2 || napi_get_typedarray_info(env, argv[0], &type, &n, &data, &arraybuffer, &offset) != napi_ok ||
      type != napi_uint8_array || napi_get_value_uint32(env, argv[1], &crc) != napi_ok) {
    napi_throw_type_error(env, NULL, "crc32c(uint8array, crc)");
    return NULL;
  }
  uint32_t c = ~crc;
#if defined(__x86_64__)
  c = __builtin_cpu_supports("sse4.2") ? crc32c_hw(c, data, n) : crc32c_sw(c, data, n);
#else
  c = crc32c_sw(c, data, n);
#endif
  napi_value out;
  napi_create_uint32(env, ~c, &out);
  return out;
}

// readCodeCache(path, chunkSize, chunkMtimeMs) -> Buffer | null: the V8 data of a code cache file
// (cli/code-cache.ts writes them: "VFC1", CRC-32C of the data, the chunk's size and mtime in ms
// as little-endian doubles, then the data), or null when it is missing, damaged or for another
// version of the chunk. One call instead of fs.readFileSync, whose first use compiled Node's code
// for it (0.6 ms of every start).
#define CACHE_HEADER 24
#define CACHE_MAX (64 << 20)
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static double le_double(const uint8_t *p) {
  uint64_t v = (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
  double d;
  memcpy(&d, &v, sizeof d);
  return d;
}
static uint32_t crc32c_of(const uint8_t *p, size_t n) {
  uint32_t c = ~0u;
#if defined(__x86_64__)
  c = __builtin_cpu_supports("sse4.2") ? crc32c_hw(c, p, n) : crc32c_sw(c, p, n);
#else
  c = crc32c_sw(c, p, n);
#endif
  return ~c;
}
static napi_value read_code_cache(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], out;
  char path[4096];
  size_t len;
  double size, mtime;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 3 || napi_get_value_string_utf8(env, argv[0], path, sizeof path, &len) != napi_ok ||
      napi_get_value_double(env, argv[1], &size) != napi_ok || napi_get_value_double(env, argv[2], &mtime) != napi_ok) {
    napi_throw_type_error(env, NULL, "readCodeCache(path, chunkSize, chunkMtimeMs)");
    return NULL;
  }
  napi_get_null(env, &out);
  if (len >= sizeof path - 1) return out;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  struct stat st;
  uint8_t *file = NULL;
  size_t got = 0;
  if (fstat(fd, &st) == 0 && st.st_size > CACHE_HEADER && st.st_size <= CACHE_MAX && (file = malloc((size_t)st.st_size))) {
    while (got < (size_t)st.st_size) {
      ssize_t n = read(fd, file + got, (size_t)st.st_size - got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      got += (size_t)n;
    }
  }
  close(fd);
  if (file && got == (size_t)st.st_size && le32(file) == 0x31434656u && le_double(file + 8) == size &&
      le_double(file + 16) == mtime && crc32c_of(file + CACHE_HEADER, got - CACHE_HEADER) == le32(file + 4)) {
    napi_create_buffer_copy(env, got - CACHE_HEADER, file + CACHE_HEADER, NULL, &out);
  }
  free(file);
  return out;
}

// exitNow(code): ends the process at once (_exit), skipping what exit() runs after Node's 'exit'
// event: the environment's cleanup, the V8 heap's teardown, atexit handlers (3 to 4 ms of a 0.12 s
// convert). Nothing is lost: Node writes stdout and stderr synchronously to files, pipes and
// terminals on Linux, and this helper keeps no buffered output.
static napi_value exit_now(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t code = 0;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &code) != napi_ok) {
    napi_throw_type_error(env, NULL, "exitNow(code)");
    return NULL;
  }
  _exit(code);
}

// In v8_flags.cc: the one function that needs V8's C++ API.
napi_value vmferry_set_v8_flags(napi_env env, napi_callback_info info);

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seek", NULL, seek_data_hole, NULL, NULL, NULL, napi_default, NULL},
      {"allocation", NULL, allocation_map, NULL, NULL, NULL, napi_default, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"mapWindow", NULL, map_window, NULL, NULL, NULL, napi_default, NULL},
      {"mapFile", NULL, map_file, NULL, NULL, NULL, napi_default, NULL},
      {"copyRange", NULL, copy_range, NULL, NULL, NULL, napi_default, NULL},
      {"writeAt", NULL, write_at, NULL, NULL, NULL, napi_default, NULL},
      {"offloadsCopies", NULL, offloads_copies_js, NULL, NULL, NULL, napi_default, NULL},
      {"preallocate", NULL, preallocate_range, NULL, NULL, NULL, napi_default, NULL},
      {"looksIncompressible", NULL, looks_incompressible, NULL, NULL, NULL, napi_default, NULL},
      {"zeroAt", NULL, zero_at, NULL, NULL, NULL, napi_default, NULL},
      {"zeroMap", NULL, zero_map, NULL, NULL, NULL, napi_default, NULL},
      {"adler32", NULL, adler32_sum, NULL, NULL, NULL, napi_default, NULL},
      {"crc32c", NULL, crc32c_sum, NULL, NULL, NULL, napi_default, NULL},
      {"setV8Flags", NULL, vmferry_set_v8_flags, NULL, NULL, NULL, napi_default, NULL},
      {"exitNow", NULL, exit_now, NULL, NULL, NULL, napi_default, NULL},
      {"readCodeCache", NULL, read_code_cache, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
