# Windows x64: build\cuda\dgcuda.dll, what scripts/build_cuda.sh builds as libdgcuda.so on Linux. Not yet run on a
# Windows GPU machine. Run from a "x64 Native Tools" prompt (nvcc needs MSVC's cl.exe for the CUDA sources, and lib.exe
# is used below) with mingw-w64's gcc on PATH (the CPU library, native\*.c, is GNU C that MSVC does not compile):
#   1. the CPU library as dgguf_cpu.dll (mingw-w64, libgcc and winpthreads static) and an import library for MSVC;
#   2. native\cuda\*.cu (but check.cu) by nvcc, linked against it into dgcuda.dll; dgguf_cpu.dll stays beside it.
# runtime/cuda.py finds dgcuda.dll there (or through DGGUF_CUDA_LIB) and the CUDA runtime DLLs in %CUDA_PATH%\bin.
#   powershell -File scripts\windows\build_cuda.ps1 [-Archs 86,89] [-Out build\cuda]
param([string]$Archs = "80", [string]$Out = "build\cuda")
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..\..")
New-Item -ItemType Directory -Force -Path $Out | Out-Null
$cflags = "-std=c11 -O3 -fno-strict-aliasing -fno-trapping-math -Wall -Wextra -Wno-unused-parameter -Inative".Split(" ")
$sources = Get-ChildItem native\*.c | ForEach-Object { $_.FullName }
& gcc @cflags -shared -static -o "$Out\dgguf_cpu.dll" @sources -lpthread "-Wl,--output-def,$Out\dgguf_cpu.def"
if ($LASTEXITCODE) { throw "gcc failed" }
& lib /nologo /machine:x64 "/def:$Out\dgguf_cpu.def" "/out:$Out\dgguf_cpu.lib"
if ($LASTEXITCODE) { throw "lib failed" }
$list = $Archs.Split(",")
$highest = ($list | ForEach-Object { [int]$_ } | Measure-Object -Maximum).Maximum
$gencode = @($list | ForEach-Object { "-gencode=arch=compute_$_,code=sm_$_" }) + "-gencode=arch=compute_$highest,code=compute_$highest"
$cu = Get-ChildItem native\cuda\*.cu | Where-Object { $_.Name -ne "check.cu" } | ForEach-Object { $_.FullName }
& nvcc -std=c++17 -O3 -Inative -Inative\cuda @gencode -shared -o "$Out\dgcuda.dll" @cu "$Out\dgguf_cpu.lib"
if ($LASTEXITCODE) { throw "nvcc failed" }
Write-Output "build_cuda: $Out\dgcuda.dll (with $Out\dgguf_cpu.dll) for compute capabilities $Archs (+ PTX $highest)"
