//! A restricted pickle interpreter for `torch.save` state dicts.
//!
//! Python's pickle is a program: its `GLOBAL` and `REDUCE` opcodes import and
//! call arbitrary functions, which is why loading an untrusted `.pth` in
//! Python can run code. This interpreter understands only what a dict of
//! tensors needs: a few literal opcodes, containers, the memo, and calls to
//! three whitelisted globals (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`),
//! with `torch.*Storage` names accepted as inert markers inside persistent
//! ids. Every other global and every other opcode is refused by name.
//!
//! It never calls anything: "calls" build plain records ([`Value::Tensor`]).
//! It is also bounded: strings are length-checked against the remaining input
//! before allocation, values nest at most [`MAX_DEPTH`] deep (so recursive
//! drops and walks cannot overflow the stack), marks nest at most
//! [`MAX_MARKS`], and memo copies are charged against a fixed budget so that a
//! "billion laughs" of memo references cannot blow up memory or time.
//!
//! One deliberate simplification: the memo holds copies, not shared
//! references, so mutating a container after memoizing it is not seen through
//! later memo reads. `torch.save` never re-reads a container it mutated
//! (the memoized items are storages, tuples and globals), so state dicts load
//! exactly as Python loads them.

use crate::error::{Error, Result};
use std::collections::HashMap;

/// Deepest nesting of containers accepted. A state dict needs 4.
pub(crate) const MAX_DEPTH: usize = 32;
/// Deepest nesting of MARKs accepted. A state dict needs 3.
pub(crate) const MAX_MARKS: usize = 64;
/// Most values the stack may hold at once.
const MAX_STACK: usize = 1 << 20;
/// Value nodes (plus string bytes) that memo puts and gets may copy, beyond
/// [`COPY_BUDGET_PER_BYTE`] per input byte. A real state dict copies a few
/// dozen per tensor; a memo bomb copies exponentially many.
const COPY_BUDGET_BASE: usize = 1 << 20;
const COPY_BUDGET_PER_BYTE: usize = 64;
/// Longest `module` or `name` line of a GLOBAL opcode.
const MAX_GLOBAL_LINE: usize = 256;

/// A callable or class named by GLOBAL that this interpreter accepts.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    /// `torch.<Name>Storage`, e.g. `BFloat16Storage`: only ever a marker in a
    /// persistent id; which ones carry supported dtypes is decided by the caller.
    StorageClass(String),
}

/// A persistent-id reference to a storage record of the archive.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StorageRef {
    /// Class name without the `torch.` prefix, e.g. `BFloat16Storage`.
    pub class: String,
    /// Member name under `<top>/data/`.
    pub key: String,
    /// Device the tensor was saved from (`cpu`, `cuda:0`, ...); informational.
    pub location: String,
    /// Elements in the storage.
    pub numel: u64,
}

/// What `_rebuild_tensor_v2(storage, offset, size, stride, ...)` describes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TensorRecord {
    pub storage: StorageRef,
    /// In elements.
    pub offset: u64,
    pub size: Vec<u64>,
    /// In elements.
    pub stride: Vec<u64>,
}

/// A pickled value this interpreter can represent.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered, like Python's dict and OrderedDict.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(TensorRecord),
}

impl Value {
    /// Python-ish type name, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn children(&self) -> Box<dyn Iterator<Item = &Value> + '_> {
        match self {
            Value::Tuple(v) | Value::List(v) => Box::new(v.iter()),
            Value::Dict(kv) => Box::new(kv.iter().flat_map(|(k, v)| [k, v])),
            _ => Box::new(std::iter::empty()),
        }
    }

    /// Nesting depth (1 for a scalar). Recursion is bounded because every
    /// value was built under the [`MAX_DEPTH`] check.
    fn depth(&self) -> usize {
        1 + self.children().map(Value::depth).max().unwrap_or(0)
    }

    /// Copy cost: nodes plus string bytes, or `None` once it exceeds `limit`
    /// (so pricing a huge value costs no more than the budget left).
    fn weight_within(&self, limit: usize) -> Option<usize> {
        let own = 1 + match self {
            Value::Str(s) => s.len(),
            Value::Storage(s) => s.key.len() + s.location.len(),
            Value::Tensor(t) => t.size.len() + t.stride.len(),
            _ => 0,
        };
        let mut total = own;
        for c in self.children() {
            total = total.checked_add(c.weight_within(limit.checked_sub(total)?)?)?;
        }
        (total <= limit).then_some(total)
    }
}

/// Run the pickle `data`; `path` and `what` name it in errors.
pub(crate) fn load(path: &str, what: &str, data: &[u8]) -> Result<Value> {
    let budget = COPY_BUDGET_BASE.saturating_add(data.len().saturating_mul(COPY_BUDGET_PER_BYTE));
    Vm { path, what, data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), budget }.run()
}

struct Vm<'a> {
    path: &'a str,
    what: &'a str,
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK (CPython's "metastack").
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    budget: usize,
}

/// Python's name of each opcode this interpreter may meet, for messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

impl<'a> Vm<'a> {
    fn err(&self, at: usize, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("{} at byte {at}: {msg}", self.what))
    }

    fn take(&mut self, n: usize, at: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        let end = self.pos.checked_add(n).filter(|&e| e <= data.len());
        let end = end.ok_or_else(|| {
            self.err(at, format!("truncated: needs {n} more bytes, {} left", data.len() - self.pos.min(data.len())))
        })?;
        let s = data.get(self.pos..end).ok_or_else(|| self.err(at, "truncated"))?;
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self, at: usize) -> Result<u8> {
        Ok(self.take(1, at)?.first().copied().unwrap_or(0))
    }

    fn le<const N: usize>(&mut self, at: usize) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, at)?);
        Ok(a)
    }

    fn len_prefixed_str(&mut self, len: u64, at: usize) -> Result<String> {
        // Compare with what is left before allocating anything.
        let left = self.data.len() - self.pos.min(self.data.len());
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= left)
            .ok_or_else(|| self.err(at, format!("string of declared length {len} exceeds the {left} bytes left")))?;
        let bytes = self.take(n, at)?;
        std::str::from_utf8(bytes).map(str::to_string).map_err(|_| self.err(at, "string is not valid UTF-8"))
    }

    fn line(&mut self, at: usize) -> Result<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = data.get(self.pos..).unwrap_or(&[]);
        let n = rest
            .iter()
            .take(MAX_GLOBAL_LINE + 1)
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(at, "GLOBAL name is unterminated or longer than 256 bytes"))?;
        let s = self.take(n + 1, at)?;
        std::str::from_utf8(s.get(..n).unwrap_or(&[])).map_err(|_| self.err(at, "GLOBAL name is not UTF-8"))
    }

    fn push(&mut self, v: Value, at: usize) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(at, "stack exceeds 1M values"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self, at: usize, op: u8) -> Result<Value> {
        // Values below the innermost mark belong to an outer construct.
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, format!("{} on an empty stack", opcode_name(op))));
        }
        self.stack.pop().ok_or_else(|| self.err(at, "empty stack"))
    }

    fn pop_mark(&mut self, at: usize, op: u8) -> Result<Vec<Value>> {
        let m = self.marks.pop().ok_or_else(|| self.err(at, format!("{} without a MARK", opcode_name(op))))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn top_mut(&mut self, at: usize, op: u8) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err(at, format!("{} on an empty stack", opcode_name(op))));
        }
        let e = self.err(at, "empty stack");
        self.stack.last_mut().ok_or(e)
    }

    fn check_depth(&self, items: &[&Value], at: usize) -> Result<()> {
        if items.iter().any(|v| v.depth() >= MAX_DEPTH) {
            return Err(self.err(at, format!("values nest deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn container(&self, items: Vec<Value>, at: usize, make: fn(Vec<Value>) -> Value) -> Result<Value> {
        self.check_depth(&items.iter().collect::<Vec<_>>(), at)?;
        Ok(make(items))
    }

    fn memo_put(&mut self, key: u32, at: usize) -> Result<()> {
        let Some(top) = self.stack.last() else {
            return Err(self.err(at, "memo put on an empty stack"));
        };
        let Some(v) = charged_copy(&mut self.budget, top) else {
            return Err(self.err(at, "memo copies exceed the size budget (a pickle bomb?)"));
        };
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.byte(at).map_err(|_| self.err(at, "truncated: no STOP opcode"))?;
            match op {
                0x80 => {
                    let proto = self.byte(at)?;
                    if proto > 5 {
                        return Err(self.err(at, format!("pickle protocol {proto} is not supported")));
                    }
                }
                0x95 => {
                    // FRAME only announces how many bytes follow; they are read as they come.
                    let n = u64::from_le_bytes(self.le::<8>(at)?);
                    let left = (self.data.len() - self.pos.min(self.data.len())) as u64;
                    if n > left {
                        return Err(self.err(at, format!("frame of {n} bytes exceeds the {left} bytes left")));
                    }
                }
                b'.' => {
                    if !self.marks.is_empty() || self.stack.len() != 1 {
                        return Err(self.err(
                            at,
                            format!(
                                "STOP with {} values and {} open marks (expected 1 value)",
                                self.stack.len(),
                                self.marks.len()
                            ),
                        ));
                    }
                    return self.stack.pop().ok_or_else(|| self.err(at, "empty stack at STOP"));
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(at, format!("MARKs nest deeper than {MAX_MARKS}")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'N' => self.push(Value::None, at)?,
                0x88 => self.push(Value::Bool(true), at)?,
                0x89 => self.push(Value::Bool(false), at)?,
                b'}' => self.push(Value::Dict(Vec::new()), at)?,
                b')' => self.push(Value::Tuple(Vec::new()), at)?,
                b']' => self.push(Value::List(Vec::new()), at)?,
                b'J' => {
                    let v = i32::from_le_bytes(self.le::<4>(at)?);
                    self.push(Value::Int(v.into()), at)?
                }
                b'K' => {
                    let v = self.byte(at)?;
                    self.push(Value::Int(v.into()), at)?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le::<2>(at)?);
                    self.push(Value::Int(v.into()), at)?
                }
                0x8a => {
                    let n = self.byte(at)? as usize;
                    if n > 8 {
                        return Err(self.err(at, format!("LONG1 of {n} bytes does not fit 64 bits")));
                    }
                    let bytes = self.take(n, at)?;
                    // Little-endian two's complement, sign-extended from the last byte.
                    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xFF } else { 0 };
                    let mut a = [fill; 8];
                    a.get_mut(..n).unwrap_or(&mut []).copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(a)), at)?
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le::<8>(at)?);
                    self.push(Value::Float(v), at)?
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.le::<4>(at)?);
                    let s = self.len_prefixed_str(n.into(), at)?;
                    self.push(Value::Str(s), at)?
                }
                0x8c => {
                    let n = self.byte(at)?;
                    let s = self.len_prefixed_str(n.into(), at)?;
                    self.push(Value::Str(s), at)?
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.le::<8>(at)?);
                    let s = self.len_prefixed_str(n, at)?;
                    self.push(Value::Str(s), at)?
                }
                b't' => {
                    let items = self.pop_mark(at, op)?;
                    let v = self.container(items, at, Value::Tuple)?;
                    self.push(v, at)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at, op)?);
                    }
                    items.reverse();
                    let v = self.container(items, at, Value::Tuple)?;
                    self.push(v, at)?
                }
                b'q' => {
                    let k = self.byte(at)?;
                    self.memo_put(k.into(), at)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le::<4>(at)?);
                    self.memo_put(k, at)?
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err(at, "memo overflow"))?;
                    self.memo_put(k, at)?
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.byte(at)?.into() } else { u32::from_le_bytes(self.le::<4>(at)?) };
                    let Some(stored) = self.memo.get(&k) else {
                        return Err(self.err(at, format!("memo key {k} was never stored")));
                    };
                    let Some(v) = charged_copy(&mut self.budget, stored) else {
                        return Err(self.err(at, "memo copies exceed the size budget (a pickle bomb?)"));
                    };
                    self.push(v, at)?
                }
                b'c' => {
                    let module = self.line(at)?;
                    let name = self.line(at)?;
                    let g = self.resolve_global(module, name, at)?;
                    self.push(Value::Global(g), at)?
                }
                0x93 => {
                    let name = self.pop(at, op)?;
                    let module = self.pop(at, op)?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err(at, "STACK_GLOBAL needs two strings"));
                    };
                    let g = self.resolve_global(&module, &name, at)?;
                    self.push(Value::Global(g), at)?
                }
                b'Q' => {
                    let pid = self.pop(at, op)?;
                    let s = self.persistent_load(pid, at)?;
                    self.push(Value::Storage(s), at)?
                }
                b'R' => {
                    let args = self.pop(at, op)?;
                    let func = self.pop(at, op)?;
                    let v = self.reduce(func, args, at)?;
                    self.push(v, at)?
                }
                b'b' => {
                    // BUILD sets instance state; torch uses it to attach
                    // `_metadata` to a state dict's OrderedDict. It carries no
                    // tensor data, so it is accepted on dicts and dropped.
                    let _state = self.pop(at, op)?;
                    let target = self.top_mut(at, op)?;
                    if !matches!(target, Value::Dict(_)) {
                        let kind = target.kind();
                        return Err(self.err(at, format!("BUILD on a {kind} is not supported (only on dicts)")));
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop(at, op)?;
                        let k = self.pop(at, op)?;
                        vec![k, v]
                    } else {
                        self.pop_mark(at, op)?
                    };
                    if items.len() % 2 != 0 {
                        return Err(self.err(at, "SETITEMS with an odd number of values"));
                    }
                    self.check_depth(&items.iter().collect::<Vec<_>>(), at)?;
                    let target = self.top_mut(at, op)?;
                    let Value::Dict(d) = target else {
                        let kind = target.kind();
                        return Err(self.err(at, format!("{} on a {kind}", opcode_name(op))));
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop(at, op)?] } else { self.pop_mark(at, op)? };
                    self.check_depth(&items.iter().collect::<Vec<_>>(), at)?;
                    let target = self.top_mut(at, op)?;
                    let Value::List(l) = target else {
                        let kind = target.kind();
                        return Err(self.err(at, format!("{} on a {kind}", opcode_name(op))));
                    };
                    l.extend(items);
                }
                _ => {
                    return Err(self.err(
                        at,
                        format!("opcode 0x{op:02x} ({}) is not allowed in a tensor state dict", opcode_name(op)),
                    ))
                }
            }
        }
    }

    fn resolve_global(&self, module: &str, name: &str, at: usize) -> Result<Global> {
        let is_storage =
            |n: &str| n.len() <= 40 && n.ends_with("Storage") && n.bytes().all(|b| b.is_ascii_alphanumeric());
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", n) if is_storage(n) => Ok(Global::StorageClass(n.to_string())),
            _ => Err(self.err(
                at,
                format!(
                    "global '{module}.{name}' refused: a tensor state dict may only name collections.OrderedDict, \
                     torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter and torch.*Storage"
                ),
            )),
        }
    }

    /// `('storage', torch.XStorage, key, location, numel)` → a storage reference.
    fn persistent_load(&self, pid: Value, at: usize) -> Result<StorageRef> {
        let bad = |what: &str| self.err(at, format!("persistent id: {what}"));
        let Value::Tuple(items) = pid else {
            return Err(bad(&format!("expected a tuple, found a {}", pid.kind())));
        };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(Global::StorageClass(class)), Value::Str(key), Value::Str(location), Value::Int(numel)]
                if tag == "storage" =>
            {
                let numel = u64::try_from(*numel).map_err(|_| bad(&format!("negative element count {numel}")))?;
                Ok(StorageRef { class: class.clone(), key: key.clone(), location: location.clone(), numel })
            }
            _ => Err(bad("expected ('storage', torch.<Type>Storage, key, location, numel)")),
        }
    }

    fn reduce(&self, func: Value, args: Value, at: usize) -> Result<Value> {
        let Value::Global(g) = func else {
            return Err(self.err(at, format!("REDUCE calls a {}, not a whitelisted global", func.kind())));
        };
        let Value::Tuple(args) = args else {
            return Err(self.err(at, format!("REDUCE arguments are a {}, not a tuple", args.kind())));
        };
        let empty_dict = |v: &Value| matches!(v, Value::Dict(d) if d.is_empty());
        match (g, args.as_slice()) {
            (Global::OrderedDict, []) => Ok(Value::Dict(Vec::new())),
            (
                Global::RebuildTensorV2,
                [Value::Storage(s), Value::Int(off), Value::Tuple(size), Value::Tuple(stride), Value::Bool(_), hooks, meta @ ..],
            ) if empty_dict(hooks)
                && (meta.is_empty() || matches!(meta, [Value::None]) || matches!(meta, [m] if empty_dict(m))) =>
            {
                let nonneg = |v: &Value, what: &str| match v {
                    Value::Int(i) => {
                        u64::try_from(*i).map_err(|_| self.err(at, format!("tensor {what} {i} is negative")))
                    }
                    other => Err(self.err(at, format!("tensor {what} is a {}, not an int", other.kind()))),
                };
                let size = size.iter().map(|v| nonneg(v, "size")).collect::<Result<Vec<_>>>()?;
                let stride = stride.iter().map(|v| nonneg(v, "stride")).collect::<Result<Vec<_>>>()?;
                if size.len() != stride.len() {
                    return Err(self.err(at, format!("tensor has {} sizes but {} strides", size.len(), stride.len())));
                }
                let offset = nonneg(&Value::Int(*off), "storage offset")?;
                Ok(Value::Tensor(TensorRecord { storage: s.clone(), offset, size, stride }))
            }
            (Global::RebuildParameter, [t @ Value::Tensor(_), Value::Bool(_), hooks]) if empty_dict(hooks) => {
                Ok(t.clone())
            }
            (g, _) => Err(self.err(at, format!("REDUCE of {g:?} with unexpected arguments ({} values)", args.len()))),
        }
    }
}

/// Copy `v` (for a memo put or get) if its weight fits the budget left,
/// paying for it; `None` when it does not.
fn charged_copy(budget: &mut usize, v: &Value) -> Option<Value> {
    let w = v.weight_within(*budget)?;
    *budget -= w;
    Some(v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &[u8]) -> Result<Value> {
        load("x.pth", "arch/data.pkl", p)
    }

    fn refused(p: &[u8], want: &str) {
        match run(p) {
            Err(Error::Format { path, message }) => {
                assert_eq!(path, "x.pth");
                assert!(message.contains(want), "message {message:?} lacks {want:?}");
            }
            other => panic!("expected a format error containing {want:?}, got {other:?}"),
        }
    }

    /// The exact bytes of the released data.pkl prefix for one tensor,
    /// as shown by pickletools (protocol 2).
    fn torch_tensor_entry() -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(
            b"X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03",
        );
        p.extend_from_slice(
            b"ctorch\nBFloat16Storage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06J\x00\x00\x06\x00tq\x07Q",
        );
        p.extend_from_slice(b"K\x00K\x08M\x80\x01K\x80\x87q\x08M\x00\xc0K\x80K\x01\x87q\x09\x89ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0d");
        p
    }

    #[test]
    fn reads_torch_protocol2_state_dict() {
        let mut p = b"\x80\x02}q\x00(".to_vec();
        p.extend(torch_tensor_entry());
        p.extend_from_slice(b"u.");
        let Value::Dict(items) = run(&p).unwrap() else { panic!("not a dict") };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, Value::Str("w".into()));
        let Value::Tensor(t) = &items[0].1 else { panic!("not a tensor") };
        assert_eq!(
            t.storage,
            StorageRef { class: "BFloat16Storage".into(), key: "0".into(), location: "cpu".into(), numel: 393216 }
        );
        assert_eq!((t.offset, t.size.clone(), t.stride.clone()), (0, vec![8, 384, 128], vec![49152, 128, 1]));
    }

    #[test]
    fn reads_protocol4_opcodes_and_variants() {
        // FRAME, SHORT_BINUNICODE, STACK_GLOBAL, MEMOIZE, LONG_BINPUT/GET,
        // TUPLE1/2, LONG1, NEWTRUE, _rebuild_parameter, cuda location, BUILD
        // of OrderedDict metadata, an empty list with APPENDS.
        let mut p = b"\x80\x04\x95\x00\x01\x00\x00\x00\x00\x00\x00".to_vec();
        p.extend_from_slice(b"\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(");
        p.extend_from_slice(b"\x8c\x01w\x8c\x0ctorch._utils\x8c\x12_rebuild_parameter\x93");
        p.extend_from_slice(b"\x8c\x0ctorch._utils\x8c\x12_rebuild_tensor_v2\x93r\x09\x00\x00\x00");
        p.extend_from_slice(b"((\x8c\x07storage\x8c\x05torch\x8c\x0bHalfStorage\x93\x8c\x011\x8c\x06cuda:0K\x06t\x94Q");
        p.extend_from_slice(b"K\x02K\x02K\x02\x86K\x02\x8a\x01\x01\x86\x88j\x02\x00\x00\x00)R\x94tR");
        p.extend_from_slice(b"\x88j\x02\x00\x00\x00)R\x87R");
        p.extend_from_slice(b"\x8c\x01l]\x94(K\x01\x8a\x02\xff\xffG?\xf0\x00\x00\x00\x00\x00\x00N\x89eu");
        p.extend_from_slice(b"}\x8c\x09_metadata}sb.");
        let frame_len = (p.len() - 11) as u64;
        p[3..11].copy_from_slice(&frame_len.to_le_bytes());
        let Value::Dict(items) = run(&p).unwrap() else { panic!("not a dict") };
        let Value::Tensor(t) = &items[0].1 else { panic!("not a tensor: {:?}", items[0].1) };
        assert_eq!(
            (t.storage.class.as_str(), t.storage.location.as_str(), t.storage.numel),
            ("HalfStorage", "cuda:0", 6)
        );
        assert_eq!((t.offset, t.size.clone(), t.stride.clone()), (2, vec![2, 2], vec![2, 1]));
        assert_eq!(
            items[1].1,
            Value::List(vec![Value::Int(1), Value::Int(-1), Value::Float(1.0), Value::None, Value::Bool(false)])
        );
    }

    #[test]
    fn refuses_code_execution_globals() {
        refused(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.", "global 'os.system' refused");
        refused(b"\x80\x02cbuiltins\neval\n.", "builtins.eval");
        refused(b"\x80\x02cposix\nsystem\n.", "posix.system");
        refused(b"\x8c\nsubprocess\x8c\x05Popen\x93.", "subprocess.Popen");
        refused(b"\x80\x02ctorch\nload\n.", "torch.load");
        // A storage class is a marker, never callable.
        refused(b"\x80\x02ctorch\nFloatStorage\n)R.", "REDUCE of StorageClass");
        // Opcodes that call or build objects by other routes.
        refused(b"\x80\x02(cos\nsystem\no.", "os.system");
        refused(b"\x80\x02(X\x01\x00\x00\x00xo.", "OBJ");
        refused(b"\x80\x02ios\nsystem\n.", "INST");
        refused(b"\x80\x02\x82\x01.", "EXT1");
        refused(b"\x80\x02\xff.", "0xff (unknown)");
        refused(b"\x80\x06.", "protocol 6");
    }

    #[test]
    fn refuses_resource_abuse() {
        refused(b"\x80\x02X\xff\xff\xff\x7fabc.", "declared length 2147483647");
        refused(b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\xffabc.", "exceeds");
        refused(b"\x80\x04\x95\xff\xff\xff\xff\x00\x00\x00\x00N.", "frame");
        // Deep nesting through TUPLE1.
        let mut deep = b"\x80\x02N".to_vec();
        deep.extend(std::iter::repeat(0x85).take(100_000));
        deep.push(b'.');
        refused(&deep, "nest deeper");
        // MARK abuse: more open marks than allowed, and unbalanced marks.
        refused(&[b'('; 100_000], "MARKs nest deeper");
        refused(b"\x80\x02(N.", "open marks");
        refused(b"\x80\x02t.", "without a MARK");
        refused(b"\x80\x02(\x85.", "empty stack");
        refused(b"\x80\x02}(Nu.", "odd number");
        refused(b"\x80\x02N(NNu.", "SETITEMS on a None");
        // A memo bomb: each level holds 8 copies of the one before.
        let mut bomb = b"\x80\x02Nq\x00".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"(h\x00h\x00h\x00h\x00h\x00h\x00h\x00h\x00tq\x00");
        }
        bomb.push(b'.');
        refused(&bomb, "budget");
        refused(b"\x80\x02h\x07.", "never stored");
        refused(b"\x80\x02N", "no STOP");
        refused(b"", "no STOP");
        refused(b"\x80\x02X\x01\x00\x00\x00\xff.", "UTF-8");
        refused(b"\x80\x02ctorch\nBFloat16Storage", "unterminated");
        // Persistent ids must be storage tuples; tensor args must be sane.
        refused(b"\x80\x02NQ.", "persistent id");
        refused(b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\xff\xff\xff\xfftQ.", "negative");
    }

    #[test]
    fn never_panics_on_mutations() {
        let mut base = b"\x80\x02}q\x00(".to_vec();
        base.extend(torch_tensor_entry());
        base.extend_from_slice(b"u.");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut p = base.clone();
            let i = (seed % p.len() as u64) as usize;
            p[i] = (seed >> 32) as u8;
            if seed & 1 == 0 {
                p.truncate((seed >> 40) as usize % p.len());
            }
            let _ = run(&p);
        }
    }
}
