// Compiled core of the RWKV World tokenizer: greedy longest match over UTF-8 bytes.
//
// The vocabulary is stored as a double-array trie (one int triple per trie slot), so each input
// byte costs one array read whose validity is checked by the `check` field of the slot it lands
// on. Written against the plain CPython API, without torch or pybind11 headers, so the built
// library depends on nothing but libc/libstdc++ and can be loaded in worker processes that never
// import torch. data_prep/core.py builds it (through torch.utils.cpp_extension) and loads it.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME rwkv_world_tokenizer
#endif
#define STR2(x) #x
#define STR(x) STR2(x)
#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

namespace {

struct Slot {
  int32_t base;   // children of this node live at base + byte
  int32_t check;  // the parent node index, -1 when the slot is free
  int32_t value;  // token id ending here, 0 when none
};

struct Vocab {
  std::vector<Slot> slots;              // slot 0 is the root
  std::vector<std::string> token_bytes;  // id -> bytes (empty for unused ids)
  std::vector<PyObject*> ints;           // id -> cached Python int
};

const char* kCapsuleName = "rwkv_world_tokenizer.Vocab";

// Builds the double array from (bytes, id) pairs sorted by bytes. Every trie node is the range
// of sorted keys sharing a prefix; its children are the distinct next bytes in that range.
void build_double_array(Vocab& v, std::vector<std::pair<std::string, int32_t>>& keys) {
  std::sort(keys.begin(), keys.end());
  v.slots.assign(256 * 4, Slot{0, -1, 0});
  v.slots[0].check = -2;  // the root has no parent
  struct Work {
    int32_t node;
    size_t lo, hi, depth;
  };
  std::vector<Work> stack{{0, 0, keys.size(), 0}};
  size_t first_free = 1;
  std::vector<std::pair<uint8_t, std::pair<size_t, size_t>>> kids;
  while (!stack.empty()) {
    Work w = stack.back();
    stack.pop_back();
    size_t lo = w.lo;
    if (lo < w.hi && keys[lo].first.size() == w.depth) {
      v.slots[w.node].value = keys[lo].second;  // shortest key sorts first
      ++lo;
    }
    kids.clear();
    for (size_t i = lo; i < w.hi;) {
      uint8_t c = static_cast<uint8_t>(keys[i].first[w.depth]);
      size_t j = i + 1;
      while (j < w.hi && static_cast<uint8_t>(keys[j].first[w.depth]) == c) ++j;
      kids.push_back({c, {i, j}});
      i = j;
    }
    if (kids.empty()) continue;
    while (first_free < v.slots.size() && v.slots[first_free].check != -1) ++first_free;
    // Smallest base >= 1 whose slots for every child byte are free.
    int32_t base = std::max<int64_t>(1, static_cast<int64_t>(first_free) - kids[0].first);
    for (;; ++base) {
      size_t need = static_cast<size_t>(base) + 256;
      if (need > v.slots.size()) v.slots.resize(need * 2, Slot{0, -1, 0});
      bool ok = true;
      for (auto& k : kids) {
        if (v.slots[base + k.first].check != -1) {
          ok = false;
          break;
        }
      }
      if (ok) break;
    }
    v.slots[w.node].base = base;
    for (auto& k : kids) v.slots[base + k.first].check = w.node;
    for (auto& k : kids) {
      stack.push_back({base + k.first, k.second.first, k.second.second, w.depth + 1});
    }
  }
  // Every lookup reads base + byte <= max base + 255: keep that in bounds.
  int32_t max_base = 0;
  for (auto& s : v.slots) max_base = std::max(max_base, s.base);
  v.slots.resize(std::max<size_t>(v.slots.size(), static_cast<size_t>(max_base) + 256),
                 Slot{0, -1, 0});
}

// Greedy longest match; calls emit(id) per token. Returns false if some byte has no token.
template <class Emit>
bool encode_bytes(const Vocab& v, const uint8_t* data, size_t n, Emit emit) {
  const Slot* s = v.slots.data();
  size_t i = 0;
  while (i < n) {
    int32_t node = 0, best_id = 0;
    size_t best_end = i;
    for (size_t j = i; j < n; ++j) {
      int32_t t = s[node].base + data[j];
      if (s[t].check != node) break;
      node = t;
      if (s[t].value) {
        best_id = s[t].value;
        best_end = j + 1;
      }
    }
    if (best_end == i) return false;
    emit(best_id);
    i = best_end;
  }
  return true;
}

void vocab_free(PyObject* capsule) {
  auto* v = static_cast<Vocab*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  if (!v) return;
  for (PyObject* o : v->ints) Py_XDECREF(o);
  delete v;
}

Vocab* get_vocab(PyObject* capsule) {
  return static_cast<Vocab*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

// The input as UTF-8 bytes: a str (its cached UTF-8 form, as str.encode would give) or any
// contiguous buffer. `view` must be released by the caller when `is_buffer` is set.
bool get_input(PyObject* obj, Py_buffer* view, bool* is_buffer, const uint8_t** data,
               Py_ssize_t* n) {
  *is_buffer = false;
  if (PyUnicode_Check(obj)) {
    const char* p = PyUnicode_AsUTF8AndSize(obj, n);
    if (!p) return false;
    *data = reinterpret_cast<const uint8_t*>(p);
    return true;
  }
  if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) != 0) return false;
  *is_buffer = true;
  *data = static_cast<const uint8_t*>(view->buf);
  *n = view->len;
  return true;
}

template <class Out>
PyObject* run_encode(PyObject* args, Out make_output) {
  PyObject *capsule, *obj;
  if (!PyArg_ParseTuple(args, "OO", &capsule, &obj)) return nullptr;
  Vocab* v = get_vocab(capsule);
  if (!v) return nullptr;
  Py_buffer view;
  bool is_buffer;
  const uint8_t* data;
  Py_ssize_t n;
  if (!get_input(obj, &view, &is_buffer, &data, &n)) return nullptr;
  std::vector<uint16_t> ids;
  bool ok;
  Py_BEGIN_ALLOW_THREADS;
  ids.reserve(static_cast<size_t>(n) / 3 + 16);
  ok = encode_bytes(*v, data, static_cast<size_t>(n),
                    [&](int32_t id) { ids.push_back(static_cast<uint16_t>(id)); });
  Py_END_ALLOW_THREADS;
  if (is_buffer) PyBuffer_Release(&view);
  if (!ok) {
    PyErr_SetString(PyExc_ValueError, "the vocabulary cannot encode some byte of the input");
    return nullptr;
  }
  return make_output(*v, ids);
}

// new_vocab(tokens: list[bytes | None]) -> capsule; tokens[id] is the byte string of id.
PyObject* py_new_vocab(PyObject*, PyObject* args) {
  PyObject* list;
  if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &list)) return nullptr;
  Py_ssize_t count = PyList_GET_SIZE(list);
  if (count > 65536) {
    PyErr_SetString(PyExc_ValueError, "ids must fit in uint16");
    return nullptr;
  }
  auto* v = new Vocab();
  std::vector<std::pair<std::string, int32_t>> keys;
  v->token_bytes.resize(count);
  v->ints.assign(count, nullptr);
  for (Py_ssize_t id = 0; id < count; ++id) {
    PyObject* item = PyList_GET_ITEM(list, id);
    v->ints[id] = PyLong_FromSsize_t(id);
    if (!v->ints[id]) goto fail;
    if (item == Py_None) continue;
    if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) == 0 || id == 0) {
      PyErr_SetString(PyExc_ValueError, "tokens[id] must be non-empty bytes or None (id 0)");
      goto fail;
    }
    v->token_bytes[id].assign(PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item));
    keys.emplace_back(v->token_bytes[id], static_cast<int32_t>(id));
  }
  build_double_array(*v, keys);
  {
    PyObject* capsule = PyCapsule_New(v, kCapsuleName, vocab_free);
    if (capsule) return capsule;
  }
fail:
  for (PyObject* o : v->ints) Py_XDECREF(o);
  delete v;
  return nullptr;
}

// encode(vocab, str | bytes-like) -> list[int]
PyObject* py_encode(PyObject*, PyObject* args) {
  return run_encode(args, [](const Vocab& v, const std::vector<uint16_t>& ids) -> PyObject* {
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(ids.size()));
    if (!out) return nullptr;
    for (size_t k = 0; k < ids.size(); ++k) {
      PyObject* o = v.ints[ids[k]];
      Py_INCREF(o);
      PyList_SET_ITEM(out, static_cast<Py_ssize_t>(k), o);
    }
    return out;
  });
}

// encode_u16(vocab, str | bytes-like) -> bytes holding native-endian uint16 ids
PyObject* py_encode_u16(PyObject*, PyObject* args) {
  return run_encode(args, [](const Vocab&, const std::vector<uint16_t>& ids) -> PyObject* {
    return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(ids.data()),
                                     static_cast<Py_ssize_t>(ids.size() * sizeof(uint16_t)));
  });
}

// decode(vocab, ids: sequence of int) -> bytes
PyObject* py_decode(PyObject*, PyObject* args) {
  PyObject *capsule, *seq;
  if (!PyArg_ParseTuple(args, "OO", &capsule, &seq)) return nullptr;
  Vocab* v = get_vocab(capsule);
  if (!v) return nullptr;
  PyObject* fast = PySequence_Fast(seq, "ids must be a sequence of int");
  if (!fast) return nullptr;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::string out;
  out.reserve(static_cast<size_t>(n) * 4);
  for (Py_ssize_t k = 0; k < n; ++k) {
    long id = PyLong_AsLong(items[k]);
    if (id == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return nullptr;
    }
    if (id < 0 || id >= static_cast<long>(v->token_bytes.size()) || v->token_bytes[id].empty()) {
      Py_DECREF(fast);
      PyErr_Format(PyExc_ValueError, "token id %ld is not in the vocabulary", id);
      return nullptr;
    }
    out += v->token_bytes[id];
  }
  Py_DECREF(fast);
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

PyMethodDef kMethods[] = {
    {"new_vocab", py_new_vocab, METH_VARARGS, "Build the trie from tokens[id] = bytes."},
    {"encode", py_encode, METH_VARARGS, "Encode str or bytes to a list of ids."},
    {"encode_u16", py_encode_u16, METH_VARARGS, "Encode str or bytes to uint16 ids as bytes."},
    {"decode", py_decode, METH_VARARGS, "Concatenate the bytes of the given ids."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME),
                       "RWKV World tokenizer core", -1, kMethods};

}  // namespace

PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
