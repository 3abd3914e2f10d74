# Shared helpers for the Windows acceptance tests.
$ErrorActionPreference = 'Stop'
$Cairn = (Resolve-Path "$PSScriptRoot\..\..\target\release\cairn.exe").Path
$script:Failures = 0

function Start-Cairn([string]$Drive, [string[]]$Extra = @()) {
    $env:CAIRN_HOME = Join-Path $env:TEMP "cairn-acceptance"
    $p = Start-Process -FilePath $Cairn -ArgumentList (@('mount', $Drive, '--writeback-delay', '0') + $Extra) -PassThru -NoNewWindow
    for ($i = 0; $i -lt 100 -and -not (Test-Path "$Drive\"); $i++) { Start-Sleep -Milliseconds 100 }
    if (-not (Test-Path "$Drive\")) { throw "cairn did not mount $Drive" }
    return $p
}

function Stop-Cairn($Process) {
    # Ctrl-C equivalent: the daemon unmounts and seals what is open.
    & $Cairn sync | Out-Null
    Stop-Process -Id $Process.Id
    $Process.WaitForExit(30000) | Out-Null
}

function Versions([string]$Path) {
    (& $Cairn versions --json $Path | ConvertFrom-Json).versions
}

function Check([string]$Name, [bool]$Ok, [string]$Saw) {
    if ($Ok) { Write-Host "PASS $Name" } else { Write-Host "FAIL $Name ($Saw)"; $script:Failures++ }
}
